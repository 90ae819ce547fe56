"""MEmeL's small parts against plain references: batch moments and the capped merge against numpy's
mean and sum of squares over the samples merged, the sample variance, the buffer pool's reuse and
slots, and the checkpoint loader's message when the places do not match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models import insert_memel
from neurorewrite.models.memel_checkpoint import load_memel_state_dict, memel_state_dict
from neurorewrite.models.memel_pool import BufferPool
from neurorewrite.models.memel_stats import batch_moments, merge_capped_, unbiased_variance


def moments_of(z: np.ndarray, mu: np.ndarray) -> tuple[float, torch.Tensor, torch.Tensor]:
    """What batch_moments returns for the batch ``z`` around the running mean ``mu``."""
    d = torch.tensor(z - mu, dtype=torch.float64)
    return batch_moments(d.sum(0), d.pow(2).sum(0), len(z), sync_ranks=False)


@pytest.mark.parametrize("rows", [1, 5])
def test_batch_moments_are_the_batch_mean_offset_and_sum_of_squares(rows: int) -> None:
    rng = np.random.default_rng(rows)
    z = 3.0 + 0.1 * rng.standard_normal((rows, 4))  # a small spread: m2 well below one
    mu = np.array([2.9, 3.0, 3.1, 3.2])
    count, offset, m2 = moments_of(z, mu)
    assert count == rows
    np.testing.assert_allclose(offset.numpy(), z.mean(0) - mu, rtol=1e-12)
    np.testing.assert_allclose(m2.numpy(), ((z - z.mean(0)) ** 2).sum(0), rtol=1e-9, atol=1e-15)


def test_merging_without_forgetting_gives_the_statistics_of_all_samples() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3)) + 1.0 for n in (1, 1, 4, 0, 2)]  # single samples and an empty batch
    mean, m2, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0.0
    seen = np.empty((0, 3))
    for z in batches:
        before = count
        count = merge_capped_(count, mean, m2, moments_of(z, mean.numpy().copy()), n_forget=1000)
        seen = np.concatenate([seen, z])
        assert count == before + len(z)
        np.testing.assert_allclose(mean.numpy(), seen.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m2.numpy(), ((seen - seen.mean(0)) ** 2).sum(0), rtol=1e-9, atol=1e-12)


def test_the_merge_caps_the_old_statistics_at_n_forget_minus_one_batches() -> None:
    mean, m2 = torch.tensor([1.0], dtype=torch.float64), torch.tensor([8.0], dtype=torch.float64)  # 4 samples, spread 2
    z = np.array([[3.0], [5.0]])
    count = merge_capped_(4.0, mean, m2, moments_of(z, mean.numpy().copy()), n_forget=2)
    # the old statistics are worth one batch (2 samples) now: mean 1 and per-sample spread 2 on 2 samples
    old = np.array([1.0 - np.sqrt(2), 1.0 + np.sqrt(2)])  # two samples with that mean and spread
    both = np.concatenate([old, z[:, 0]])
    assert count == 4.0
    np.testing.assert_allclose(mean.numpy(), [both.mean()], rtol=1e-12)
    np.testing.assert_allclose(m2.numpy(), [((both - both.mean()) ** 2).sum()], rtol=1e-12)


def test_the_sample_variance_divides_by_count_minus_one_and_keeps_m2_below_two_samples() -> None:
    m2 = torch.tensor([6.0])
    assert unbiased_variance(2.0, m2).item() == 6.0
    assert unbiased_variance(4.0, m2).item() == 2.0
    assert unbiased_variance(1.0, m2).item() == 6.0 and unbiased_variance(0.0, m2).item() == 6.0


def test_the_pool_reuses_free_buffers_keeps_two_and_replaces_one_of_another_size() -> None:
    pool = BufferPool()
    held = [pool.empty(torch.Size([4, 5])) for _ in range(3)]  # all in use: the third is not pooled
    assert [a.size for a in pool._arrays] == [20, 20]
    pointers = {t.data_ptr() for t in held[:2]}
    del held
    again = [pool.empty(torch.Size([5, 4])) for _ in range(2)]  # free now: the same memory, any shape of that size
    assert {t.data_ptr() for t in again} == pointers and all(t.shape == (5, 4) for t in again)
    del again
    other = pool.empty(torch.Size([3, 3]))  # the batch size changed: a free buffer is replaced
    assert sorted(a.size for a in pool._arrays) == [9, 20]
    pointer = other.data_ptr()
    del other
    assert pool.empty(torch.Size([9])).data_ptr() == pointer


def test_loading_memel_state_into_other_places_names_both_sides() -> None:
    def mlp() -> torch.nn.Sequential:
        return torch.nn.Sequential(*(torch.nn.Linear(4, 4) if i % 2 == 0 else torch.nn.ReLU() for i in range(8)))

    state = memel_state_dict(insert_memel(mlp(), after=["1", "3"]))
    other = insert_memel(mlp(), after=["5"])
    with pytest.raises(InvalidOptionError) as caught:
        load_memel_state_dict(other, state)
    assert str(caught.value) == (
        "load_memel_state_dict: saved for '1', '3' but the model has no MEmeL there; the model's MEmeL after '5' "
        "has no saved state (insert_memel after the same submodules before loading)")
    with pytest.raises(InvalidOptionError) as caught:
        load_memel_state_dict(insert_memel(mlp(), after=["1", "3", "5", "7"]), state)
    assert str(caught.value) == ("load_memel_state_dict: the model's MEmeL after '5', '7' has no saved state "
                                 "(insert_memel after the same submodules before loading)")


class Pair(torch.nn.Module):
    """A submodule returning a tuple: the activation first, two other values after it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
        return torch.relu(x), x.sum(), "tag"


class Words(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> str:
        return "not a tensor"


def test_insert_memel_defaults_and_options_reach_every_memel() -> None:
    from neurorewrite.models.memel import find_memel

    model = insert_memel(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()), after="1")
    (memel,) = find_memel(model).values()
    assert (memel.top_t, memel.delta, memel.n_forget, memel.sync_ranks) == (1, 1.0, 10, True)
    model = insert_memel(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()), after=["1"], top_t=2, delta=0.5,
                         n_forget=4, sync_ranks=False)
    (memel,) = find_memel(model).values()
    assert (memel.top_t, memel.delta, memel.n_forget, memel.sync_ranks) == (2, 0.5, 4, False)


def test_insert_memel_messages() -> None:
    def mlp() -> torch.nn.Sequential:
        return torch.nn.Sequential(*(torch.nn.Linear(4, 4) if i % 2 == 0 else torch.nn.ReLU() for i in range(20)))

    from collections import OrderedDict

    named = torch.nn.Sequential(OrderedDict([("stem", torch.nn.Linear(4, 4))] + [(f"block{i}", torch.nn.ReLU()) for i in range(10)]))
    with pytest.raises(InvalidOptionError) as caught:  # the three closest names, each once
        insert_memel(named, after=["stem", "blockx", "blocky"])
    assert str(caught.value) == ("insert_memel: Sequential has no submodule named 'blockx', 'blocky'; valid names include "
                                 "'block9', 'block8', 'block7'")
    cases = [
        (["1", "31", "x"], "insert_memel: Sequential has no submodule named '31', 'x'; valid names include '3', '1'"),
        ([], "insert_memel: `after` is empty; name submodules such as '0', '1', '2', '3', '4', '5', '6', '7'"),
        (["1", "3", "1", "3"], "insert_memel: MEmeL would follow '1', '3' twice; name each submodule once (call "
                               "remove_memel first to re-insert with other options)"),
    ]
    for after, message in cases:
        with pytest.raises(InvalidOptionError) as caught:
            insert_memel(mlp(), after=after)
        assert str(caught.value) == message


def test_the_hook_follows_the_module_and_keeps_a_tuples_other_values() -> None:
    from neurorewrite.models.memel import find_memel

    model = insert_memel(torch.nn.Sequential(torch.nn.Linear(3, 5), Pair()), after="1")
    (memel,) = find_memel(model).values()
    memel.eval()
    x = torch.randn(4, 3)
    model.train()
    out = model(x)
    assert memel.training and memel.count == 4  # it followed the module into training and saw the batch
    assert out[1] is not None and out[2] == "tag" and len(out) == 3
    torch.testing.assert_close(out[1], model[0](x).sum())
    model.eval()
    model(x)
    assert memel.count == 4  # an evaluation pass is not a training batch
    broken = insert_memel(torch.nn.Sequential(Words()), after="0").train()
    with pytest.raises(InvalidOptionError) as caught:
        broken(x)
    assert str(caught.value) == ("MEmeL after '0': that submodule returns str, not a tensor or a tuple starting with "
                                 "one; insert MEmeL after a submodule that returns the activation tensor")


@pytest.mark.parametrize("eager", [False, True])
def test_a_batch_of_one_sample_counts_as_a_batch(eager: bool) -> None:
    import contextlib

    from neurorewrite.models.memel import MEmeL
    from neurorewrite.models.memel_fused import eager_only

    memel = MEmeL(n_forget=3).train()
    with eager_only() if eager else contextlib.nullcontext():
        for _ in range(3):
            memel(torch.rand(1, 6))
    assert memel.get_extra_state() == {"count": 3, "batches_seen": 3}


@pytest.mark.parametrize("eager", [False, True])
def test_top_t_elements_are_replaced_per_row(eager: bool) -> None:
    import contextlib

    from neurorewrite.models.memel import MEmeL
    from neurorewrite.models.memel_fused import eager_only

    memel = MEmeL(top_t=2, n_forget=1).train()
    g = torch.Generator().manual_seed(3)
    with eager_only() if eager else contextlib.nullcontext():
        for _ in range(3):
            z = torch.rand(8, 10, generator=g) * 4
            out = memel(z)
    assert ((out != z).sum(dim=1) == 2).all()


def test_activation_shape_errors_and_the_statistics_dtype() -> None:
    from neurorewrite.models.memel import MEmeL

    memel = MEmeL(top_t=3, name="act").train()
    with pytest.raises(InvalidOptionError) as caught:
        memel(torch.rand(5))
    assert str(caught.value) == ("MEmeL after 'act' got an activation of shape (5,); it needs (batch, features...): insert "
                                 "it after a layer whose output has a feature dimension")
    memel(torch.rand(4, 3))  # top_t equal to the features: allowed
    memel(torch.rand(4, 3))
    assert memel.count == 8  # the statistics are kept, not started again
    with pytest.raises(InvalidOptionError) as caught:
        memel(torch.rand(4, 2, 2))
    assert str(caught.value) == (
        "MEmeL after 'act': the activation has 4 elements per sample but earlier batches had 3; MEmeL keeps statistics "
        "per element, so the feature shape must stay fixed (pad sequences to one length, or insert MEmeL after another layer)")
    with pytest.raises(InvalidOptionError) as caught:
        MEmeL(top_t=3, name="act").train()(torch.rand(4, 2))
    assert str(caught.value) == "MEmeL option top_t=3 exceeds the 2 elements per sample after 'act'"
    wide = MEmeL().train()
    wide(torch.rand(4, 3, dtype=torch.float64))
    assert wide.mean.dtype == wide.m2.dtype == torch.float64  # never below the activation's precision
    narrow = MEmeL().train()
    narrow(torch.rand(4, 3, dtype=torch.float16))
    assert narrow.mean.dtype == torch.float32  # never below float32 either


@pytest.mark.parametrize("eager", [False, True])
def test_an_empty_batch_is_not_a_batch_seen(eager: bool) -> None:
    import contextlib

    from neurorewrite.models.memel import MEmeL
    from neurorewrite.models.memel_fused import eager_only

    memel = MEmeL().train()
    with eager_only() if eager else contextlib.nullcontext():
        memel(torch.rand(3, 6))
        out = memel(torch.rand(0, 6))
    assert out.shape == (0, 6) and memel.get_extra_state() == {"count": 3, "batches_seen": 1}


def test_statistics_load_into_a_fresh_memel_with_their_dtype() -> None:
    from neurorewrite.models.memel import MEmeL

    trained = MEmeL().train()
    for _ in range(3):
        trained(torch.rand(4, 3, dtype=torch.float64))
    fresh = MEmeL()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.mean.dtype == fresh.m2.dtype == torch.float64
    assert torch.equal(fresh.mean, trained.mean) and torch.equal(fresh.m2, trained.m2)
    assert fresh.get_extra_state() == trained.get_extra_state() == {"count": 12, "batches_seen": 3}


def test_phi_follows_the_papers_formula_with_its_floor() -> None:
    """phi = (z - mean)^2 / (s^2 + 0.01 mean(s^2)), s^2 the sample variance, floored at epsilon for a layer
    that has been constant so far."""
    from neurorewrite.models.memel import MEmeL

    two = MEmeL(n_forget=100).train()
    two(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))  # two samples: mean (2, 5), sample variance (2, 0)
    phi = two.monosemantic_scale(torch.tensor([[4.0, 6.0]]))
    torch.testing.assert_close(phi, torch.tensor([[4.0 / 2.01, 1.0 / 0.01]]), rtol=1e-5, atol=0.0)
    one = MEmeL(n_forget=100).train()
    one(torch.tensor([[1.0], [3.0], [8.0]]))  # one feature: mean(s^2) is its own s^2 = 13
    torch.testing.assert_close(one.monosemantic_scale(torch.tensor([[0.0]])), torch.tensor([[16.0 / (13.0 * 1.01)]]),
                               rtol=1e-5, atol=0.0)
    dead = MEmeL(n_forget=100).train()
    # constant over four samples so far: the denominator is the floor, epsilon per unit of variance (3 units)
    dead(torch.tensor([[2.0], [2.0], [2.0], [2.0]]))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(dead.monosemantic_scale(torch.tensor([[3.0]])), torch.tensor([[1.0 / eps]]), rtol=1e-5, atol=0.0)


def test_threads_for_splits_by_whole_threads() -> None:
    from neurorewrite.models.memel_fused import ELEMENTS_PER_THREAD, threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        counts = [threads_for(n) for n in (0, ELEMENTS_PER_THREAD - 1, ELEMENTS_PER_THREAD * 3 // 2, 2 * ELEMENTS_PER_THREAD,
                                           100 * ELEMENTS_PER_THREAD)]
    finally:
        torch.set_num_threads(before)
    assert counts == [1, 1, 1, 2, 2] and all(type(c) is int for c in counts)


def test_memel_defaults_option_errors_and_unshaped_statistics() -> None:
    from neurorewrite.models.memel import MEmeL

    memel = MEmeL()
    assert (memel.top_t, memel.delta, memel.n_forget, memel.sync_ranks, memel.name) == (1, 1.0, 10, True, "MEmeL")
    assert {k: tuple(v.shape) for k, v in memel.state_dict().items() if isinstance(v, torch.Tensor)} == {
        "mean": (0,), "m2": (0,)}  # shaped by the first activation
    for options, message in (
        ({"top_t": 0}, "MEmeL option top_t must be an integer >= 1, got 0"),
        ({"n_forget": 0}, "MEmeL option n_forget must be an integer >= 1, got 0"),
        ({"delta": float("nan")}, "MEmeL option delta must be a finite number (1 = RD, 0 or -1 = naive), got nan"),
    ):
        with pytest.raises(InvalidOptionError) as caught:
            MEmeL(**options)
        assert str(caught.value) == message


def test_work_tensors_are_kept_between_steps_of_one_shape() -> None:
    """MEmeL's cost promise rests on not allocating per step: the eager code's centred-values tensor and
    the fused step's packed sums, row workspace and buffer pools are made once and reused while the batch
    shape allows (a fresh tensor costs page faults); a wider batch gets a workspace that fits."""
    from neurorewrite.models.memel import MEmeL
    from neurorewrite.models.memel_fused import eager_only
    from neurorewrite.models.memel_native import kernel_status, native_kernel

    gen = torch.Generator().manual_seed(0)
    batch = lambda rows: torch.randn(rows, 16, generator=gen) + 2.0  # noqa: E731

    eager = MEmeL().train()
    with eager_only():
        eager(batch(8))
        scratch = eager._scratch
        eager(batch(8))
        assert eager._scratch is scratch
        eager(batch(4))  # another shape: a tensor of that shape
        assert eager._scratch.shape == (4, 16)

    if native_kernel() is None:
        pytest.skip(f"the fused step needs the native kernel; MEmeL runs {kernel_status()}")
    fused = MEmeL(n_forget=2).train()
    for _ in range(3):  # past n_forget batches: the steps inhibit and use the pools
        fused(batch(8))
    kept = (fused._packed_sums, fused._row_best, fused._pools)
    fused(batch(8))
    fused(batch(5))  # fewer rows fit the workspace
    assert all(now is before for now, before in zip((fused._packed_sums, fused._row_best, fused._pools), kept))
    fused(batch(12))
    assert fused._row_best.numel() >= 12 and fused._packed_sums is kept[0] and fused._pools is kept[2]
