"""fpe_expand on Hugging Face models built from tiny configs (random weights, no network): the blocks
found by family, the model kept usable (class, config, forward, generate), the export equal to
``neurorewrite expand`` on the exported dense model (weights and masks), and onnxruntime agreeing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from neurorewrite.api import expand
from neurorewrite.models import MaskedLinear, export_onnx, finetune, fpe_expand
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights
from neurorewrite.rewriter.record import read_record
from neurorewrite.runtime.ort import ort_session
from tests.models.hf_models import H, build, inputs

torch.set_num_threads(1)

LLAMA = ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj")
T5 = "encoder.block.0.layer.1.DenseReluDense."
FAMILIES = {  # name -> (first, up, second, activation)
    "llama": (LLAMA[0], LLAMA[1], LLAMA[2], "SiLU"),
    "mistral": (LLAMA[0], LLAMA[1], LLAMA[2], "SiLU"),
    "qwen2": (LLAMA[0], LLAMA[1], LLAMA[2], "SiLU"),
    "gemma": (LLAMA[0], LLAMA[1], LLAMA[2], "GELU(tanh)"),
    "t5_gated": (T5 + "wi_0", T5 + "wi_1", T5 + "wo", "GELU(tanh)"),  # gelu_new written out in Python
    "t5_relu": (T5 + "wi", None, T5 + "wo", "ReLU"),
    "bert": ("encoder.layer.0.intermediate.dense", None, "encoder.layer.0.output.dense", "GELU"),
    "vit": ("layers.0.mlp.fc1", None, "layers.0.mlp.fc2", "GELU"),
    "gpt2": ("h.0.mlp.c_fc", None, "h.0.mlp.c_proj", "GELU(tanh)"),  # HF Conv1D, weight stored (in, out)
    "phi3": ("layers.0.mlp.gate_up_proj", None, "layers.0.mlp.down_proj", "SiLU"),  # fused, cut by chunk(2)
    "falcon": ("h.0.mlp.dense_h_to_4h", None, "h.0.mlp.dense_4h_to_h", "GELU"),  # FalconLinear: x @ weight.T
}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def first(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_found_by_family_and_the_model_kept_usable(name):
    model, feeds = build(name), inputs(name)
    before = state(model)
    new = fpe_expand(model, alpha=2, seed=0, example_inputs=feeds)
    first_path, up, second, activation = FAMILIES[name]
    record, report = new.fpe_record, new.fpe_report
    assert report.tracer == "torch.export"
    assert [(b.first, b.up, b.second, b.activation) for b in record.blocks] == [
        (first_path, up, second, activation)
    ]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the input model changed"
    assert type(new) is type(model) and new.config.to_dict() == model.config.to_dict()
    paths = [p for p in (first_path, up, second) if p is not None]
    assert all(isinstance(new.get_submodule(p), MaskedLinear) for p in paths)
    nnz = lambda m, ps: sum(int(torch.count_nonzero(t)) for p in ps for t in m.get_submodule(p).parameters())  # noqa: E731
    assert nnz(new, paths) == nnz(model, paths) == record.blocks[0].nnz_after
    assert record.blocks[0].form == ("gated (fused gate/up)" if name == "phi3" else "gated" if up else "mlp")
    assert {w.module for w in report.widened} == set(paths) and all(w.after == 2 * w.before for w in report.widened)
    with torch.no_grad():
        assert first(new(**feeds)).shape == first(model(**feeds)).shape


def test_causal_lm_generates_after_expansion_and_finetuning():
    model = build("llama_lm", layers=2)
    feeds = inputs("llama_lm")
    new = fpe_expand(model, alpha=2, example_inputs=feeds)
    assert len(new.fpe_record.blocks) == 2
    with torch.no_grad():
        target = model(**feeds).logits
    finetune(new, [(feeds, target)], epochs=2, lr=1e-3)  # distil to the dense logits, masks fixed
    for layer in (m for m in new.modules() if isinstance(m, MaskedLinear)):
        assert not bool(layer.weight.detach()[~layer.weight_mask].any())
    out = new.generate(feeds["input_ids"], attention_mask=feeds["attention_mask"], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)


def onnx_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray | None]]:
    index = GraphIndex.build(model.graph)
    return [read_weights(index, lin) for lin in find_linears(index).values()]


SLOW = pytest.mark.slow  # the same form as a fast case: kept out of the fast tier


@pytest.mark.parametrize("name", [
    "bert", "gpt2", "llama", "phi3", "falcon", "llama:tiered", "bert:tiered", "bert:tiered:0.6",
    *(pytest.param(n, marks=SLOW) for n in ("vit", "t5_relu", "t5_gated", "qwen2", "gemma", "llama_hf_init")),
])
def test_export_equals_the_onnx_pass_on_the_dense_export(tmp_path, name):
    """``export_onnx(fpe_expand(m))`` == ``neurorewrite expand`` on ``export_onnx(m)``: every linear's
    weights and masks, two layers (two blocks, two seeds), and the same function in onnxruntime.
    ``_hf_init``: HF's own init (zero biases, unit norms: the exporter merges the equal tensors);
    ``:tiered``: the tiered split (without a sample, by the weights' magnitudes on both sides), ``:0.6``
    with that lead share."""
    name, _, split = name.partition(":")
    split, _, share = split.partition(":")
    lead_share = float(share) if share else None
    base = name.removesuffix("_hf_init")
    model, feeds = build(base, layers=2, perturbed=base == name), inputs(base)
    export_onnx(model, tmp_path / "dense.onnx", feeds)
    new = fpe_expand(model, alpha=3, split=split or "random", seed=5, example_inputs=feeds, lead_share=lead_share)
    torch_side = export_onnx(new, tmp_path / "torch.onnx", feeds)
    onnx_side, report = expand(tmp_path / "dense.onnx", alpha=3, split=split or None, seed=5, lead_share=lead_share)
    assert report.split == new.fpe_record.config.split == (split or "random")
    assert report.lead_share == new.fpe_record.config.lead_share == lead_share
    assert read_record(torch_side).config.lead_share == lead_share
    assert len(report.blocks) == len(new.fpe_record.blocks) == 2
    pairs = list(zip(onnx_weights(torch_side), onnx_weights(onnx_side), strict=True))
    for (wt, bt), (wo, bo) in pairs:
        assert wt.shape == wo.shape
        np.testing.assert_allclose(wt, wo, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(wt != 0, wo != 0)
        if bt is not None or bo is not None:
            np.testing.assert_allclose(bt, bo, atol=1e-6, rtol=0)
    dense_shapes = [w.shape for w, _ in onnx_weights(onnx.load(tmp_path / "dense.onnx"))]
    widened = sum(wt.shape != shape for ((wt, _), _), shape in zip(pairs, dense_shapes, strict=True))
    assert widened == len(new.fpe_report.widened) == 2 * (3 if new.fpe_record.blocks[0].up else 2)  # they did widen
    onnx.checker.check_model(str(tmp_path / "torch.onnx"), full_check=True)
    meta = read_record(torch_side)
    assert [(b.torch_first, b.torch_second) for b in meta.blocks] == [(b.first, b.second) for b in new.fpe_record.blocks]
    feed = {k: v.numpy() for k, v in feeds.items()}
    got = ort_session(tmp_path / "torch.onnx").run(None, feed)[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, first(new(**feeds)).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", pytest.param("phi3", marks=SLOW), pytest.param("bert", marks=SLOW)])
def test_structured_export_equals_the_onnx_preset(tmp_path, name):
    """``fpe_expand(structured=True)`` (down/second tied to the original weights) exports the graph
    ``neurorewrite expand --structured`` writes: the grouped format, the same function."""
    model, feeds = build(name, layers=2), inputs(name)
    export_onnx(model, tmp_path / "dense.onnx", feeds)
    want_model, _ = expand(tmp_path / "dense.onnx", alpha=3, seed=5, structured=True)
    new = fpe_expand(model, alpha=3, seed=5, structured=True, example_inputs=feeds)
    exported = export_onnx(new, tmp_path / "torch.onnx", feeds)
    onnx.checker.check_model(str(tmp_path / "torch.onnx"), full_check=True)
    meta = read_record(exported)
    assert meta.structured and meta.format == "grouped" and len(meta.blocks) == 2
    feed = {k: v.numpy() for k, v in feeds.items()}
    got = ort_session(exported).run(None, feed)[0]
    want = ort_session(want_model).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(got, first(new(**feeds)).numpy(), rtol=1e-4, atol=1e-4)
        unstructured = first(fpe_expand(model, alpha=3, seed=5, example_inputs=feeds)(**feeds)).numpy()
    assert not np.allclose(unstructured, want, atol=1e-4)  # the tie matters: the test has teeth


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_the_record_export_onnx_writes_drives_the_sparse_format(tmp_path, name):
    """Later passes find the torch side's gated blocks through its record: ``lower --format sparse`` on
    the export keeps the function (onnxruntime runs it through the runtime preparation)."""
    from neurorewrite.passes.lower import lower_model

    model, feeds = build(name), inputs(name)
    new = fpe_expand(model, alpha=2, seed=1, example_inputs=feeds)
    exported = export_onnx(new, tmp_path / "torch.onnx", feeds)
    sparse, _ = lower_model(exported, "sparse")
    assert read_record(sparse).format == "sparse"
    assert any(n.op_type == "SparseLinear" for n in sparse.graph.node)
    feed = {k: v.numpy() for k, v in feeds.items()}
    with torch.no_grad():
        want = first(new(**feeds)).numpy()
    np.testing.assert_allclose(ort_session(sparse).run(None, feed)[0], want, rtol=1e-4, atol=1e-4)


def test_albert_shared_layer_is_one_block_on_both_sides(tmp_path):
    """ALBERT runs one layer (one FFN) three times: ``fpe_expand`` widens its modules once, every call
    reads them, and the export equals ``neurorewrite expand`` on the dense export, which expands the
    three blocks it finds there as one (same seed, same weights and masks)."""
    model, feeds = build("albert", layers=3), inputs("albert")
    prefix = "encoder.albert_layer_groups.0.albert_layers.0."
    new = fpe_expand(model, alpha=3, seed=4, example_inputs=feeds)
    assert [(b.first, b.second) for b in new.fpe_record.blocks] == [(prefix + "ffn", prefix + "ffn_output")]
    nnz = lambda m: sum(int(torch.count_nonzero(p)) for p in m.parameters())  # noqa: E731
    assert nnz(new) == nnz(model)
    export_onnx(model, tmp_path / "dense.onnx", feeds)
    torch_side = export_onnx(new, tmp_path / "torch.onnx", feeds)
    onnx_side, report = expand(tmp_path / "dense.onnx", alpha=3, seed=4)
    assert len(report.blocks) == 3
    widened = [(w, b) for w, b in onnx_weights(onnx_side) if w.shape[0] == 3 * H or w.shape[1] == 3 * H]
    from_torch = [(w, b) for w, b in onnx_weights(torch_side) if w.shape[0] == 3 * H or w.shape[1] == 3 * H]
    assert len(widened) == 6 and from_torch, "each of the three calls reads the widened weights"
    for (wo, bo), (wt, bt) in zip(widened, from_torch * (len(widened) // len(from_torch)), strict=True):
        np.testing.assert_allclose(wt, wo, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(wt != 0, wo != 0)
        if bt is not None or bo is not None:
            np.testing.assert_allclose(bt, bo, atol=1e-6, rtol=0)
    feed = {k: v.numpy() for k, v in feeds.items()}
    with torch.no_grad():
        want = first(new(**feeds)).numpy()
    np.testing.assert_allclose(ort_session(onnx_side).run(None, feed)[0], want, rtol=1e-4, atol=1e-4)
