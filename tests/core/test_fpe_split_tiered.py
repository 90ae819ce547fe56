"""The ``tiered`` split (docs/methods.md 1.1): each neuron deals its inputs to its children in tiers of
``|W1[i, j]| * rms(x_j)``, child 0 the largest; in the numpy core, through a gated block, and through
``expand`` with a sample (the rms measured on it)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import DEFAULT_LEAD_SHARE, FPEConfig, expand_block, expand_gated_block, split_neurons, tier_sizes
from neurorewrite.rewriter.record import read_record
from tests.builders import mlp_model


def assert_tiers(assignment: np.ndarray, score: np.ndarray, alpha: int) -> None:
    """Every row is a balanced partition and every input of child k outscores every input of child k+1."""
    d = score.shape[1]
    for row, s in zip(assignment.astype(np.int64), score):
        sizes = np.bincount(row, minlength=alpha)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == d
        for k in range(alpha - 1):
            if sizes[k] and sizes[k + 1]:
                assert s[row == k].min() >= s[row == k + 1].max()


@pytest.mark.parametrize(("h", "d", "alpha"), [(7, 12, 4), (5, 10, 3), (3, 2, 4), (2100, 9, 2)])
def test_children_take_the_inputs_in_tiers_of_the_weights_magnitude(h, d, alpha) -> None:
    """Without input scales the ranking is by |W1| (2100 rows: more than one strip of the sort)."""
    w1 = np.random.default_rng(h).standard_normal((h, d)).astype(np.float32)
    a = np.asarray(split_neurons(w1, FPEConfig(alpha=alpha, split="tiered")))
    assert a.shape == (h, d) and a.dtype == np.uint8
    assert_tiers(a, np.abs(w1), alpha)
    assert (a[:, np.argmax(np.abs(w1), axis=1)].diagonal() == 0).all(), "the largest weight goes to child 0"


def test_input_scales_weigh_the_ranking() -> None:
    """A small weight on an input a hundred times larger than the others outranks every other weight."""
    rng = np.random.default_rng(1)
    w1 = rng.uniform(0.5, 1.0, (6, 8)).astype(np.float32)
    w1[:, 5] = 0.05
    scale = np.ones(8)
    scale[5] = 100.0
    plain = np.asarray(split_neurons(w1, FPEConfig(alpha=4, split="tiered")))
    scaled = np.asarray(split_neurons(w1, FPEConfig(alpha=4, split="tiered"), input_scale=scale))
    assert (plain[:, 5] == 3).all() and (scaled[:, 5] == 0).all()
    assert_tiers(scaled, np.abs(w1) * scale, 4)


def test_ties_go_to_the_lower_input_index_and_seed_does_not_matter() -> None:
    w1 = np.ones((3, 6), np.float32)
    for seed in (0, 5):
        a = np.asarray(split_neurons(w1, FPEConfig(alpha=3, split="tiered", seed=seed)))
        assert a.tolist() == [[0, 0, 1, 1, 2, 2]] * 3
    # many ties among many inputs (an unstable sort reorders them): rank by (-|w|, index)
    w1 = np.random.default_rng(6).integers(-3, 4, (5, 64)).astype(np.float32)
    a = np.asarray(split_neurons(w1, FPEConfig(alpha=4, split="tiered")))
    for row, labels in zip(np.abs(w1), a):
        ranked = sorted(range(64), key=lambda j: (-row[j], j))
        assert [int(labels[j]) for j in ranked] == [r * 4 // 64 for r in range(64)]


def test_expanded_block_keeps_the_count_and_child_zero_carries_the_largest_weights() -> None:
    rng = np.random.default_rng(2)
    w1, b1 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2, b2 = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    exp = expand_block(w1, b1, w2, b2, FPEConfig(alpha=4, split="tiered", prune="layer"))
    assert exp.nnz_after == exp.nnz_before
    children = np.abs(exp.w1).reshape(8, 4, 16).sum(axis=2)  # (parent, child): the weight each child carries
    assert (np.diff(children, axis=1) <= 0).all(), "children hold ever smaller tiers"


def test_gated_block_ranks_by_gate_and_up_rows_together() -> None:
    """An input with a weak gate weight and a strong up weight is strong for the unit: child 0 takes it."""
    rng = np.random.default_rng(3)
    wg = rng.uniform(0.4, 0.6, (4, 8)).astype(np.float32)
    wu = rng.uniform(0.4, 0.6, (4, 8)).astype(np.float32)
    wg[:, 2], wu[:, 2] = 0.01, 5.0
    wd = rng.standard_normal((3, 4)).astype(np.float32)
    cfg = FPEConfig(alpha=2, split="tiered", prune="layer")
    g = expand_gated_block(wg, None, wu, None, wd, None, cfg)
    assert (np.asarray(g.assignment)[:, 2] == 0).all()
    magnitude = np.sqrt(wg.astype(np.float64) ** 2 + wu.astype(np.float64) ** 2)
    assert_tiers(np.asarray(g.assignment), magnitude, 2)
    scale = np.ones(8)
    scale[2], scale[6] = 1e-3, 1e3  # on the sample, input 6 dwarfs input 2
    g = expand_gated_block(wg, None, wu, None, wd, None, cfg, input_scale=scale)
    assert (np.asarray(g.assignment)[:, 6] == 0).all() and (np.asarray(g.assignment)[:, 2] == 1).all()
    assert_tiers(np.asarray(g.assignment), magnitude * scale, 2)


def test_expand_with_a_sample_ranks_by_the_inputs_rms_on_it(tmp_path) -> None:
    """Through the whole pass: input 0 is tiny in W1 but a thousand times larger than the others on the
    sample, so with the sample child 0 of every parent reads it; without one, the last child does."""
    rng = np.random.default_rng(4)
    model = mlp_model(d=8, h=6, o=3, seed=4, matmul=True, bias=False)  # no hidden bias: the layer prune keeps W1
    w1_name = model.graph.node[0].input[1]
    init = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(init[w1_name]).copy()  # (D, H): MatMul layout
    w[0, :] = 1e-3 * np.sign(w[0, :] + 1e-9)
    w[1:, :] = np.where(np.abs(w[1:, :]) < 0.1, 0.1, w[1:, :])
    init[w1_name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), w1_name))
    x = rng.standard_normal((256, 8)).astype(np.float32)
    x[:, 0] *= 1e4
    sample = {model.graph.input[0].name: x}

    def children_reading_input_0(m: onnx.ModelProto) -> np.ndarray:
        w1e = numpy_helper.to_array({t.name: t for t in m.graph.initializer}[m.graph.node[0].input[1]]).T
        return np.flatnonzero(w1e[:, 0]) % 2  # child index of each (kept) weight on input 0

    bare, _ = expand(model, alpha=2, split="tiered", prune="layer")
    with_sample, report = expand(model, alpha=2, split="tiered", prune="layer", prune_by="magnitude", calibrate=sample)
    assert report.split == "tiered"
    assert children_reading_input_0(bare).tolist() == [1] * 6 and children_reading_input_0(with_sample).tolist() == [0] * 6


@pytest.mark.parametrize(("given", "sample", "structured", "split", "prune_by", "lead_share"), [
    (None, False, False, "random", "magnitude", None),  # no sample: the paper's split, the magnitude prune
    (None, True, False, "tiered", "magnitude", DEFAULT_LEAD_SHARE),
    ("tiered", False, False, "tiered", "magnitude", None),  # tiered without a sample: balanced tiers
    ("random", True, False, "random", "activation", None),
    (None, True, True, "blocks", "activation", None),  # --structured: one partition for all neurons
])
def test_the_defaults_follow_the_sample(given, sample, structured, split, prune_by, lead_share) -> None:
    """With a sample the split is tiered with its lead share and its prune by magnitude; an explicit
    split keeps the activation-aware prune; --structured keeps its one-partition split."""
    from neurorewrite.api import check_prune_by, default_split

    model = mlp_model(d=8, h=6, o=3, seed=5)
    feeds = {model.graph.input[0].name: np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)}
    new, report = expand(model, alpha=2, split=given, structured=structured, calibrate=feeds if sample else None)
    assert report.split == split and report.lead_share == lead_share
    assert read_record(new).config.lead_share == lead_share
    assert check_prune_by(None, sample, default_split(given, sample, structured)) == prune_by


@pytest.mark.parametrize(("d", "alpha", "share", "sizes"), [
    (384, 4, 0.75, [288, 32, 32, 32]), (10, 4, 0.5, [5, 2, 2, 1]), (768, 2, 0.75, [576, 192]),
    (8, 4, 0.99, [5, 1, 1, 1]), (8, 4, 0.01, [1, 3, 2, 2]),  # every child keeps an input
    (3, 4, 0.75, [2, 1, 0, 0]), (9, 3, None, [3, 3, 3]),  # fewer inputs than children; balanced without a share
    (10, 4, 0.25, [3, 3, 2, 2]), (10, 3, 1 / 3, [4, 3, 3]),  # a share of 1/alpha: the balanced tiers exactly
    (4, 4, 0.75, [1, 1, 1, 1]),  # exactly as many inputs as children: one each, whatever the share
    (2, 4, None, [1, 1, 0, 0]),  # balanced with fewer inputs than children: a size for every child
])
def test_tier_sizes_give_the_lead_its_share_and_balance_the_rest(d, alpha, share, sizes) -> None:
    assert tier_sizes(d, alpha, share).tolist() == sizes


def test_the_lead_takes_its_share_of_the_largest_terms() -> None:
    """Child 0 takes the round(share * D) largest terms of each neuron, the others the rest in tiers;
    the count of the expanded block stays exact."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((9, 40)).astype(np.float32)
    scale = rng.uniform(0.1, 3.0, 40)
    cfg = FPEConfig(alpha=4, split="tiered", lead_share=0.6)
    a = np.asarray(split_neurons(w1, cfg, input_scale=scale)).astype(np.int64)
    score = np.abs(w1) * scale
    for row, s in zip(a, score):
        assert np.bincount(row, minlength=4).tolist() == [24, 6, 5, 5]
        for k in range(3):
            assert s[row == k].min() >= s[row == k + 1].max()
    w2, b1 = rng.standard_normal((3, 9)).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    exp = expand_block(w1, b1, w2, None, FPEConfig(alpha=4, split="tiered", lead_share=0.6))
    assert exp.nnz_after == exp.nnz_before


@pytest.mark.parametrize(("options", "message"), [
    ({"split": "tiered", "lead_share": 1.0}, "--lead-share must be a number between 0 and 1 (exclusive), got 1.0"),
    ({"split": "tiered", "lead_share": 0}, "--lead-share must be a number between 0 and 1 (exclusive), got 0"),
    ({"split": "tiered", "lead_share": True}, "--lead-share must be a number between 0 and 1 (exclusive), got True"),
    ({"split": "random", "lead_share": 0.5},
     "--lead-share shapes the tiered split; with --split random leave it out or add --split tiered"),
])
def test_a_lead_share_outside_the_tiered_split_or_range_is_refused(options, message) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        FPEConfig(alpha=4, **options)
    assert str(caught.value) == message
