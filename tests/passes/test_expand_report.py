"""What expand_model reports beside the model (passes/expand_blocks.py): progress in block order then
"writing", the options it ran with, and per block the tensors and form later passes find it by."""

from __future__ import annotations

import onnx

from neurorewrite.fpe import FPEConfig
from neurorewrite.passes.expand_blocks import expand_model
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.record import read_record


def test_progress_options_and_block_rows(exports) -> None:
    model = onnx.load(str(exports["gelu_silu_chain"]))  # a chain: two blocks sharing the middle linear
    blocks = find_blocks(model).blocks
    assert len(blocks) == 2
    calls: list[tuple[int, int, str]] = []
    cfg = FPEConfig(alpha=3, split="shared", seed=5, bias="copy", prune="layer")
    new, report = expand_model(model, cfg, progress=lambda i, n, what: calls.append((i, n, what)))
    assert calls == [(0, 2, blocks[0].name), (1, 2, blocks[1].name), (2, 2, "writing")]
    assert (report.alpha, report.split, report.seed, report.bias, report.prune) == (3, "shared", 5, "copy", "layer")
    assert report.skipped == []
    for row, block in zip(report.blocks, blocks, strict=True):
        assert (row.name, row.first, row.second) == (block.name, block.first.name, block.second.name)
        assert (row.hidden_tensor, row.output_tensor) == (block.hidden, block.second.output)
        assert (row.up, row.form, row.notes) == (None, block.form, block.notes)
        assert row.width_after == 3 * row.width_before and row.nnz_after == row.nnz_before
    assert read_record(new).blocks == tuple(report.blocks)  # the record the later passes read


def parallel_mlps(n: int) -> onnx.ModelProto:
    """``n`` independent MLP blocks reading the same input, one graph output each."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i in range(n):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"w{i}a"),
                  numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), f"w{i}b")]
        nodes += [helper.make_node("Gemm", ["x", f"w{i}a"], [f"h{i}"], transB=1, name=f"up{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("Gemm", [f"r{i}", f"w{i}b"], [f"y{i}"], transB=1, name=f"down{i}")]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nothing_to_rewrite_names_the_first_near_misses() -> None:
    import pytest

    import neurorewrite
    from neurorewrite.errors import NoBlocksError

    linear = parallel_mlps(1)
    del linear.graph.node[1:]  # one Gemm, no activation: no block and no near miss
    linear.graph.output[0].name = "h0"
    with pytest.raises(NoBlocksError) as caught:
        expand_model(linear, FPEConfig(alpha=2), where="linear.onnx")
    assert str(caught.value) == ("linear.onnx: no MLP block to rewrite "
                                 "(looked for Gemm/MatMul/Conv -> activation -> Gemm/MatMul/Conv)")
    # stored formats are near misses: each is named with why, the first five of six
    sparse, _ = neurorewrite.expand(parallel_mlps(6), alpha=2, format="sparse")
    with pytest.raises(NoBlocksError) as caught:
        expand_model(sparse, FPEConfig(alpha=2))
    names = [b.name for b in find_blocks(sparse).blocks]
    assert len(names) == 6
    detail = "; ".join(f"{n}: block {n} is stored as SparseLinear, which is read, not rewritten; expand the dense "
                       "model instead" for n in names[:5])
    assert str(caught.value) == f"model: no MLP block to rewrite (near misses: {detail})"


def test_the_report_as_a_dict_is_what_the_json_output_prints() -> None:
    _, report = expand_model(parallel_mlps(2), FPEConfig(alpha=2, seed=4))
    d = report.to_dict()
    assert (d["alpha"], d["seed"], d["format"], d["warnings"]) == (2, 4, "dense", [])
    assert [b["name"] for b in d["blocks"]] == [b.name for b in report.blocks]
    assert report.modified


def test_blocks_left_alone_are_reported_beside_those_rewritten() -> None:
    """A near miss the search found and a block kept in a stored format are both in ``report.skipped``,
    with their reason and code, while the dense block is rewritten."""
    import neurorewrite
    from onnx import TensorProto, helper

    model = parallel_mlps(3)
    model.graph.output.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, ["N", 8]))  # up2's hidden leaks
    partly_sparse, _ = neurorewrite.expand(model, alpha=2, format="sparse", layers=["up0"])
    _, report = expand_model(partly_sparse, FPEConfig(alpha=2))
    assert [b.name for b in report.blocks] == ["up1"]
    assert [(s.name, s.code, s.reason) for s in report.skipped] == [
        ("up2", "graph-output", "hidden tensor r2 is also a graph output"),
        ("up0/sparse", "stored-format",
         "block up0/sparse is stored as SparseLinear, which is read, not rewritten; expand the dense model instead"),
    ]
