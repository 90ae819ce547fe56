"""Small hand-built ONNX graphs for the cases exporters don't write (Gemm attributes, sharing, ...)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


# the ways a linear layer can be written that exporters rarely produce, for mlp_model(**variant)
LINEAR_VARIANTS = [
    {"gemm_attrs": {"transB": 0}},
    {"gemm_attrs": {"transB": 1, "alpha": 0.5, "beta": 2.0}},
    {"gemm_attrs": {"transB": 1, "transA": 1}},
    {"matmul": True},
    {"matmul": True, "bias": False},
    {"matmul": True, "rank3": True},
    {"weights_as_constants": True},
    {"weights_as_constants": True, "matmul": True},
]


def mlp_model(
    d: int = 6,
    h: int = 8,
    o: int = 3,
    act: str | None = "Relu",
    seed: int = 0,
    gemm_attrs: dict | None = None,
    matmul: bool = False,
    bias: bool = True,
    weights_as_constants: bool = False,
    rank3: bool = False,
) -> onnx.ModelProto:
    """x -> linear(d->h) -> act -> linear(h->o) -> y, as Gemm or MatMul(+Add)."""
    rng = np.random.default_rng(seed)
    attrs = dict(gemm_attrs or {})
    attrs.setdefault("transB", 1)
    trans_b = attrs["transB"]
    w1 = rng.standard_normal((h, d)).astype(np.float32)
    w2 = rng.standard_normal((o, h)).astype(np.float32)
    b1 = rng.standard_normal(h).astype(np.float32)
    b2 = rng.standard_normal(o).astype(np.float32)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> None:
        if weights_as_constants:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            inits.append(numpy_helper.from_array(value, name))

    def linear(prefix: str, inp: str, w: np.ndarray, b: np.ndarray, first: bool) -> str:
        if matmul:
            const(prefix + ".w", w.T.copy())
            nodes.append(helper.make_node("MatMul", [inp, prefix + ".w"], [prefix + ".mm"], name=prefix))
            if not bias:
                return prefix + ".mm"
            const(prefix + ".b", b)
            nodes.append(helper.make_node("Add", [prefix + ".mm", prefix + ".b"], [prefix + ".out"], name=prefix + "_add"))
            return prefix + ".out"
        const(prefix + ".w", w if trans_b else w.T.copy())
        inputs = [inp, prefix + ".w"]
        if bias:
            const(prefix + ".b", b.reshape(1, -1))
            inputs.append(prefix + ".b")
        node_attrs = attrs if first else {k: v for k, v in attrs.items() if k != "transA"}
        nodes.append(helper.make_node("Gemm", inputs, [prefix + ".out"], name=prefix, **node_attrs))
        return prefix + ".out"

    x_shape = ["N", "S", d] if rank3 else ["N", d]
    x_name = "x"
    if attrs.get("transA"):
        x_shape = [d, "N"]
    hidden = linear("fc1", x_name, w1, b1, True)
    if act is not None:
        nodes.append(helper.make_node(act, [hidden], ["act"], name="act"))
        hidden = "act"
    out = linear("fc2", hidden, w2, b2, False)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    y_shape = ["N", "S", o] if rank3 else ["N", o]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model
