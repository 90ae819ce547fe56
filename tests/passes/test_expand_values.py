"""Values, not only shapes: for alpha > 1, onnxruntime's output of every expanded export and every
linear variant equals numpy forward passes over the expanded weights.

Two references, both in float64 numpy:

1. the weights the written model holds: a small interpreter evaluates each expanded block (its linear and
   activation nodes) from the block's input and, for graphs made only of ops it knows, the whole model
   from the graph inputs. It reads Gemm's transA/transB/alpha/beta, MatMul and the bias Add itself;
2. the weights the numpy FPE core computes from the ORIGINAL model's weights (read here from the original
   graph, the documented per-block seeds, chains expanded in graph order, docs/methods.md 1.4): so a
   rewrite that permuted children, lost a scale or wrote a layout onnxruntime reads differently fails.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import neurorewrite
from neurorewrite.fpe import FPEConfig, block_seed, expand_block
from neurorewrite.rewriter.blocks import find_blocks
from tests.builders import LINEAR_VARIANTS, mlp_model
from tests.conftest import sample_for

EXPORTS = [
    "torchscript_gemm", "dynamo_gemm", "gelu_silu_chain", "gelu_erf", "gelu_tanh", "leaky", "sigmoid", "tanh",
    "elu", "softplus", "transformer", "sklearn_mlp",
]
_erf = np.vectorize(math.erf)


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _gemm(node, a, b, c=None):  # noqa: ANN001, ANN202
    a = a.T if _attr(node, "transA", 0) else a
    b = b.T if _attr(node, "transB", 0) else b
    y = _attr(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + _attr(node, "beta", 1.0) * c


def _gelu(node, x):  # noqa: ANN001, ANN202
    if _attr(node, "approximate", b"none") in (b"tanh", "tanh"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _softmax(node, x):  # noqa: ANN001, ANN202
    z = np.exp(x - x.max(axis=_attr(node, "axis", -1), keepdims=True))
    return z / z.sum(axis=_attr(node, "axis", -1), keepdims=True)


NUMPY_OPS = {
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b, "Pow": lambda n, a, b: a**b, "Sqrt": lambda n, x: np.sqrt(x),
    "Erf": lambda n, x: _erf(x), "Tanh": lambda n, x: np.tanh(x), "Sigmoid": lambda n, x: 1 / (1 + np.exp(-x)),
    "Relu": lambda n, x: np.maximum(x, 0), "LeakyRelu": lambda n, x: np.where(x >= 0, x, _attr(n, "alpha", 0.01) * x),
    "Elu": lambda n, x: np.where(x > 0, x, _attr(n, "alpha", 1.0) * (np.exp(x) - 1)),
    "Softplus": lambda n, x: np.log1p(np.exp(x)), "Gelu": _gelu, "Softmax": _softmax,
    "Identity": lambda n, x: x,
    "Cast": lambda n, x: x.astype(helper.tensor_dtype_to_np_dtype(_attr(n, "to", 1))).astype(np.float64)
    if helper.tensor_dtype_to_np_dtype(_attr(n, "to", 1)).kind == "f" else x.astype(helper.tensor_dtype_to_np_dtype(_attr(n, "to", 1))),
}


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(_attr(node, "value", None))
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in values.items()}


def numpy_eval(model: onnx.ModelProto, nodes: list[int], env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate ``nodes`` (indices, in order) of the graph in float64 numpy; every node must be known."""
    env = {**constants(model), **env}
    for i in nodes:
        node = model.graph.node[i]
        if node.op_type == "Constant":
            continue
        assert node.op_type in NUMPY_OPS, f"the numpy reference does not know {node.op_type}"
        env[node.output[0]] = NUMPY_OPS[node.op_type](node, *[env[name] for name in node.input if name])
    return env


def ort_every_tensor(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's value of every node output that shape inference can type."""
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in have and name in types:
                probe.graph.output.append(types[name])
                have.add(name)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def check_values(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Every block, and the whole model when numpy knows all its ops; returns how many blocks were checked."""
    ort_values = {**feeds, **ort_every_tensor(model, feeds)}
    blocks = find_blocks(model).blocks
    assert blocks, "the expanded model has no block to check"
    for block in blocks:
        region = sorted({*block.first.nodes, *block.activation_nodes, *block.second.nodes})
        x = ort_values[block.first.data_input].astype(np.float64)
        env = numpy_eval(model, region, {block.first.data_input: x})
        assert_close(ort_values[block.second.output], env[block.second.output], f"block {block.name}")
    if all(n.op_type in NUMPY_OPS or n.op_type == "Constant" for n in model.graph.node):
        env = numpy_eval(model, list(range(len(model.graph.node))), {k: v.astype(np.float64) for k, v in feeds.items()})
        for out in model.graph.output:
            assert_close(ort_values[out.name], env[out.name], f"model output {out.name}")
    return len(blocks)


def original_linear(model: onnx.ModelProto, lin) -> tuple[np.ndarray, np.ndarray | None]:  # noqa: ANN001
    """The effective ``W`` (out, in) and ``b`` of a linear, read from the original graph's nodes here."""
    values = constants(model)
    node = model.graph.node[lin.node]
    if node.op_type == "Gemm":
        stored = values[node.input[1]]
        w = (stored if _attr(node, "transB", 0) else stored.T) * _attr(node, "alpha", 1.0)
        b = values[node.input[2]] * _attr(node, "beta", 1.0) if len(node.input) > 2 and node.input[2] else None
    else:
        w = values[node.input[1]].T
        b = None
        if lin.add_node is not None:
            add = model.graph.node[lin.add_node]
            b = values[next(name for name in add.input if name in values)]
    return w, None if b is None else b.reshape(-1)


def check_against_the_core(original: onnx.ModelProto, expanded: onnx.ModelProto, cfg: FPEConfig,
                           feeds: dict[str, np.ndarray]) -> None:
    """Every block of ``expanded`` computes the core's expansion of ``original``'s weights."""
    blocks = find_blocks(original).blocks
    current: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for position, block in enumerate(blocks):  # graph order, as the pass and the torch side do
        w1, b1 = current.get(block.first.node) or original_linear(original, block.first)
        w2, b2 = current.get(block.second.node) or original_linear(original, block.second)
        exp = expand_block(w1, b1, w2, b2, FPEConfig(**{**cfg.__dict__, "seed": block_seed(cfg.seed, position)}))
        current[block.first.node], current[block.second.node] = (exp.w1, exp.b1), (exp.w2, exp.b2)
    ort_values = {**feeds, **ort_every_tensor(expanded, feeds)}
    for block in blocks:
        (w1, b1), (w2, b2) = current[block.first.node], current[block.second.node]
        x = ort_values[block.first.data_input].astype(np.float64)
        if _attr(original.graph.node[block.first.node], "transA", 0):
            x = x.T
        pre = x @ w1.T + (0 if b1 is None else b1)
        first_out = original.graph.node[block.first.nodes[-1]].output[0]
        hidden = numpy_eval(original, list(block.activation_nodes), {first_out: pre})[block.hidden] if block.activation_nodes else pre
        y = hidden @ w2.T + (0 if b2 is None else b2)
        assert_close(ort_values[block.second.output], y, f"block {block.name} against the core's expansion")


OPTIONS = [
    {"alpha": 3, "seed": 4},
    {"alpha": 2, "split": "shared", "bias": "copy", "prune": "layer", "seed": 1},
]


@pytest.mark.parametrize("name", EXPORTS)
def test_every_export_computes_its_expanded_weights(exports, name) -> None:
    original = onnx.load(str(exports[name]))
    feeds = sample_for(exports[name], batch=5, seed=2)
    for options in OPTIONS:
        new, report = neurorewrite.expand(original, **options)
        assert check_values(new, feeds) == len(report.blocks)
        check_against_the_core(original, new, FPEConfig(**options), feeds)


@pytest.mark.parametrize("variant", LINEAR_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("options", OPTIONS, ids=["alpha3", "alpha2-layer"])
def test_every_linear_variant_computes_its_expanded_weights(variant, options) -> None:
    model = mlp_model(**variant)
    trans_a = variant.get("gemm_attrs", {}).get("transA")
    shape = (6, 4) if trans_a else (4, 5, 6) if variant.get("rank3") else (4, 6)
    feeds = {"x": np.random.default_rng(options["alpha"]).standard_normal(shape).astype(np.float32)}
    new, report = neurorewrite.expand(model, **options)
    assert check_values(new, feeds) == 1 and report.blocks[0].width_after == options["alpha"] * report.blocks[0].width_before
    check_against_the_core(model, new, FPEConfig(**options), feeds)
