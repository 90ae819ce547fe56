"""Activations: which ops may sit between two linears, and the declared decompositions that name them.

Any region of elementwise ops whose other operands are scalar constants can be widened (every op acts
per element and broadcasts its constants), so the region walk accepts all of :data:`UNARY`,
:data:`BINARY` and onnxruntime's contrib activations (:data:`CONTRIB`). Naming the activation is a
separate, declarative step: :data:`DECOMPOSITIONS` lists the ways exporters write GELU (erf and tanh
forms, ``x^3`` as ``Pow`` or as two ``Mul``), SiLU and QuickGELU, and :func:`activation_label` returns
the first that matches the region. A region no declaration names is still rewritten; its label lists
its ops.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import onnx

from neurorewrite.rewriter.graph import GraphIndex, get_attr
from neurorewrite.rewriter.patterns import MS_DOMAIN, Const, Op, Pattern, Var, any_of, match

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Gelu",
    "Erf", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Identity", "Clip", "Dropout", "Cast",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
# onnxruntime's contrib activations (com.microsoft); BiasGelu and FastGelu may read a bias as input 1
CONTRIB = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}
# ops that make a region "look like an activation": a linear followed by one and not rewritten is reported
ACTIVATIONS = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf",
    "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Clip",
}
QUANTIZED_ACTIVATIONS = {"QLinearSigmoid", "QLinearLeakyRelu", "QGelu"}


def is_elementwise(node: onnx.NodeProto) -> bool:
    """A node the region walk may widen (acts per element; its other operands are checked apart)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type in UNARY | BINARY
    return node.domain == MS_DOMAIN and node.op_type in CONTRIB


def is_activation(node: onnx.NodeProto) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in ACTIVATIONS
    return node.domain == MS_DOMAIN and (node.op_type in CONTRIB or node.op_type in QUANTIZED_ACTIVATIONS)


def data_operands(node: onnx.NodeProto) -> list[str]:
    """The inputs of an elementwise node that carry data (a unary op's extra inputs are parameters)."""
    if node.domain == MS_DOMAIN or node.op_type in UNARY:
        return [node.input[0]] if node.input else []
    return [t for t in node.input if t]


def parameter_operands(node: onnx.NodeProto) -> list[str]:
    """The other inputs: a unary op's parameters (Clip bounds, PRelu slope), a contrib op's bias."""
    data = set(data_operands(node))
    return [t for t in node.input if t and t not in data]


# --- declared decompositions ----------------------------------------------------------------------

X = Var("x")


def _mul(a: Pattern, b: Pattern) -> Op:
    return Op("Mul", a, b, commutative=True)


def _add(a: Pattern, b: Pattern) -> Op:
    return Op("Add", a, b, commutative=True)


HALF, ONE = Const(value=0.5), Const(value=1.0)
ERF_TERM = _add(Op("Erf", any_of(Op("Div", X, Const(value=math.sqrt(2.0))), _mul(X, Const(value=1 / math.sqrt(2.0))))), ONE)
CUBE = any_of(Op("Pow", X, Const(value=3.0)), _mul(X, _mul(X, X)))
TANH_TERM = _add(Op("Tanh", _mul(_add(X, _mul(CUBE, Const(value=0.044715))), Const(value=math.sqrt(2 / math.pi)))), ONE)


def _half_product(term: Pattern) -> Pattern:
    """``0.5 * x * term`` in every order exporters write it."""
    return any_of(_mul(_mul(X, term), HALF), _mul(X, _mul(term, HALF)), _mul(_mul(X, HALF), term))


GELU_ERF = _half_product(ERF_TERM)
GELU_TANH = _half_product(TANH_TERM)
SILU = _mul(X, Op("Sigmoid", X))
QUICK_GELU = _mul(X, Op("Sigmoid", _mul(X, Const(value=1.702, tol=2e-3))))

DECOMPOSITIONS: list[tuple[str, Pattern]] = [
    ("Gelu(erf)", GELU_ERF), ("Gelu(tanh)", GELU_TANH), ("SiLU", SILU), ("QuickGelu", QUICK_GELU),
]


def _single_label(node: onnx.NodeProto) -> str:
    if node.domain == MS_DOMAIN:
        return {"FastGelu": "Gelu(tanh)", "BiasGelu": "Gelu(erf)", "Gelu": "Gelu(erf)"}.get(node.op_type, node.op_type) + " [com.microsoft]"
    approx = get_attr(node, "approximate", b"none")
    return "Gelu(tanh)" if node.op_type == "Gelu" and approx in (b"tanh", "tanh") else node.op_type


def activation_label(index: GraphIndex, start: str, end: str, nodes: Sequence[int]) -> str:
    """The name of the activation computing ``end`` from ``start`` through ``nodes`` (elementwise only)."""
    ops = [index.graph.node[i] for i in nodes]
    if not ops or start == end:
        return "Identity"
    if len(ops) == 1:
        return _single_label(ops[0])
    for name, pattern in DECOMPOSITIONS:
        m = match(index, pattern, end)
        if m and m["x"] == start and set(m.nodes) == set(nodes):
            return name
    counts = Counter(n.op_type for n in ops)
    return "elementwise(" + ",".join(sorted(counts)) + ")"
