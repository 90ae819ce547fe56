"""The lowering pass: every format computes what ``dense`` computes, on real exports, in onnxruntime."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError
from neurorewrite.passes.lower import lower_model
from neurorewrite.ops import DOMAIN, csr_arrays, narrowest_int
from neurorewrite.rewriter.record import read_record
from neurorewrite.runtime.ort import ort_session
from tests.conftest import sample_for

# (fixture model, what it stands for): a torch MLP, a transformer FFN with rank-3 input, a 2-block chain
CASES = ["torchscript_gemm", "dynamo_gemm", "transformer", "gelu_silu_chain"]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], method: str = "densify") -> list[np.ndarray]:
    return ort_session(model, providers=["CPUExecutionProvider"], sparse_method=method).run(None, feeds)


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("fmt", ["grouped", "sparse"])
def test_format_matches_dense(exports, name: str, fmt: str) -> None:
    dense, _ = expand(exports[name], alpha=3, split="shared", seed=1)
    before = _digest(dense)
    lowered, report = lower_model(dense, fmt)
    assert _digest(dense) == before  # the pass is functional
    onnx.checker.check_model(lowered, full_check=True)
    assert report.layers and read_record(lowered).format == fmt
    feeds = sample_for(exports[name], batch=5)
    want = _run(dense, feeds)
    for method in ("densify", "gather") if fmt == "sparse" else ("densify",):
        got = _run(lowered, feeds, method)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_sparse_structure_and_bytes(exports) -> None:
    dense, xrep = expand(exports["gelu_silu_chain"], alpha=4, split="random")
    lowered, report = lower_model(dense, "sparse")
    ops = Counter((n.domain, n.op_type) for n in lowered.graph.node)
    assert ops[(DOMAIN, "SparseLinear")] == 3  # L1, L2 (shared by both blocks), L3
    assert ("", "Gemm") not in ops
    assert any(o.domain == DOMAIN and o.version == 1 for o in lowered.opset_import)
    stored = sum(int(row.nonzeros) for row in report.layers)
    weights_nnz = sum(b.nnz_before for b in xrep.blocks)  # block counts share L2: compare loosely below
    assert stored <= weights_nnz
    node = next(n for n in lowered.graph.node if n.domain == DOMAIN)
    inits = {t.name: t for t in lowered.graph.initializer}
    assert inits[node.input[2]].data_type == onnx.TensorProto.INT8  # 16 inputs fit int8


def test_csr_arrays_narrowest_types() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 300)).astype(np.float32)
    w[rng.random(w.shape) < 0.75] = 0
    values, indices, indptr = csr_arrays(w)
    assert indices.dtype == np.int16 and indptr.dtype == np.int16  # 300 columns, about 3000 nonzeros
    assert narrowest_int(127) == np.int8 and narrowest_int(128) == np.int16 and narrowest_int(40000) == np.int32
    rebuilt = np.zeros_like(w)
    rows = np.repeat(np.arange(w.shape[0]), np.diff(indptr))
    rebuilt[rows, indices] = values
    np.testing.assert_array_equal(rebuilt, w)


@pytest.mark.parametrize(("split", "slicing"), [("shared", {"Gather": 4, "Split": 0}), ("blocks", {"Gather": 0, "Split": 1})])
def test_grouped_lone_tied_block_runs_one_matmul_per_child(exports, split: str, slicing: dict[str, int]) -> None:
    dense, _ = expand(exports["dynamo_gemm"], alpha=4, split=split)  # the global prune keeps W2' copies tied here
    lowered, report = lower_model(dense, "grouped")
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert {op: ops[op] for op in slicing} == slicing
    assert ops["MatMul"] == 4 + 1 and ops["Sum"] == 1 and ops["Relu"] == 4 and ops["Transpose"] == 0
    children = [t for t in lowered.graph.initializer if ".child" in t.name]
    assert [list(t.dims) for t in children] == [[4, 24]] * 4  # 16 inputs / 4 children x 24 hidden: W1's size
    assert [row.kind for row in report.layers][1] == "tied"


def test_grouped_chain_runs_a_batched_matmul(exports) -> None:
    dense, _ = expand(exports["gelu_silu_chain"], alpha=4, split="shared")
    lowered, _ = lower_model(dense, "grouped")
    blocks = [t for t in lowered.graph.initializer if t.name.endswith(".blocks")]
    assert len(blocks) == 2 and all(t.dims[0] == 4 for t in blocks)  # alpha dense blocks per first linear
    assert np.prod(blocks[0].dims) == 4 * 4 * 20  # 16 inputs / 4 children x 20 hidden: W1's size


def test_grouped_refuses_random_split_and_writes_nothing(exports, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(InvalidOptionError, match="--split blocks"):
        expand(exports["torchscript_gemm"], alpha=2, split="random", format="grouped", output=out)
    assert not out.exists()
    dense, _ = expand(exports["torchscript_gemm"], alpha=2, split="random")
    with pytest.raises(InvalidOptionError, match="grouped"):
        lower_model(dense, "grouped")


def test_unknown_format_and_missing_record(exports) -> None:
    with pytest.raises(InvalidOptionError, match="--format must be one of"):
        expand(exports["torchscript_gemm"], alpha=2, format="bsr")
    with pytest.raises(InvalidOptionError, match="no FPE record"):
        lower_model(onnx.load(str(exports["torchscript_gemm"])), "sparse")


def test_dense_format_keeps_graph(exports) -> None:
    dense, _ = expand(exports["torchscript_gemm"], alpha=2)
    lowered, report = lower_model(dense, "dense")
    assert not report.modified and read_record(lowered).format == "dense"
    assert [n.op_type for n in lowered.graph.node] == [n.op_type for n in dense.graph.node]
