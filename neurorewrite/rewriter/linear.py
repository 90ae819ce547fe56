"""Recognise the "linear" layers of a graph, each form a declared pattern (:mod:`.patterns`).

Forms: ``Gemm``, ``MatMul + Add``, ``MatMul``, onnxruntime's ``FusedMatMul``, a 1x1 ``Conv`` with
``group=1`` (a linear over the channel axis, 1), a ``MatMul`` whose bias an onnxruntime activation adds
(``BiasGelu``/``FastGelu`` with the bias as second input), and, read-only, the project's
``SparseLinear``. A :class:`Linear` records where its weight and bias live and how they are laid
out, so that passes can read the effective ``W`` (always ``(out, in)``) and ``b`` (``(out,)``) and
write new ones back.

Nodes that compute like a linear layer but cannot be read as one (quantized weights, a weight that
is computed rather than stored) are :class:`Refused` with the reason, so block detection can tell
the user why a layer followed by an activation was not rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from neurorewrite.ops import DOMAIN as SPARSE_DOMAIN
from neurorewrite.ops import OP as SPARSE_OP
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.patterns import MS_DOMAIN, Match, Maybe, Op, Reason, Var, match
from neurorewrite.rewriter.sparse_nodes import read_sparse_linear


@dataclass(frozen=True)
class Linear:
    """One linear layer ``y = x W^T + b`` found in the graph."""

    node: int  # index of the Gemm / MatMul / Conv / FusedMatMul / SparseLinear node
    name: str
    op: str  # "Gemm", "MatMul+Add", "MatMul", "FusedMatMul", "Conv", "SparseLinear"
    data_input: str
    weight: str
    weight_out_in: bool  # stored weight is (out, in) (Gemm transB=1, Conv); else (in, out)
    bias: str | None
    add_node: int | None  # the Add node that carries a MatMul's bias
    output: str  # the tensor after the bias (before it, when an activation node adds the bias)
    in_features: int
    out_features: int
    scale: float = 1.0  # Gemm / FusedMatMul alpha
    bias_scale: float = 1.0  # Gemm beta
    bias_node: int | None = None  # an activation node (BiasGelu, FastGelu) that adds the bias to ``output``
    feature_axis: int = -1  # the axis the layer mixes: 1 for a Conv (NCHW), the last for the rest
    kernel: tuple[int, ...] = ()  # a 1x1 Conv's trailing weight dimensions (all 1)
    read_only: bool = False  # a stored format (SparseLinear, grouped): read, never given new weights
    entry: int | None = None  # the node that reads ``data_input``, when it is not ``node`` (stored forms)
    parts: tuple[Linear, ...] = ()  # a composite stored form's pieces (rewriter/stored.py)
    columns: tuple[str, ...] = ()  # a stored form's column-index tensors (rewriter/stored.py)

    @property
    def entry_node(self) -> int:
        """The node that reads the layer's input."""
        return self.node if self.entry is None else self.entry

    @property
    def nodes(self) -> tuple[int, ...]:
        """The nodes that make the layer (the bias-adding activation is not one: it stays)."""
        return (self.node,) if self.add_node is None else (self.node, self.add_node)

    @property
    def bias_holder(self) -> int:
        """The node that reads the bias tensor."""
        return self.bias_node if self.bias_node is not None else self.add_node if self.add_node is not None else self.node


@dataclass(frozen=True)
class Refused:
    """A node that computes like a linear layer but cannot be read or rewritten as one, and why."""

    node: int
    name: str
    output: str
    reason: Reason


@dataclass
class LinearScan:
    linears: dict[int, Linear] = field(default_factory=dict)
    refused: dict[int, Refused] = field(default_factory=dict)


# --- the declared forms (matched at the layer's output tensor) ------------------------------------

MATMUL = Op("MatMul", Var("x"), Var("w"), name="linear")
MATMUL_ADD = Op("Add", MATMUL, Var("b"), name="add", commutative=True)
MATMUL_BIAS_ACTIVATION = Op(("BiasGelu", "FastGelu"), MATMUL, Var("b"), name="act", domain=MS_DOMAIN)
GEMM = Op("Gemm", Var("x"), Var("w"), Maybe(Var("b")), name="linear")
FUSED_MATMUL = Op(
    "FusedMatMul", Var("x"), Var("w"), name="linear", domain=MS_DOMAIN,
    attrs={"transA": 0, "transBatchA": 0, "transBatchB": 0}, defaults={"transA": 0, "transBatchA": 0, "transBatchB": 0},
)
FUSED_MATMUL_ADD = Op("Add", FUSED_MATMUL, Var("b"), name="add", commutative=True)
CONV_1X1 = Op(
    "Conv", Var("x"), Var("w"), Maybe(Var("b")), name="linear",
    attrs={"group": 1, "strides": lambda s: all(v == 1 for v in s), "pads": lambda p: all(v == 0 for v in p)},
    defaults={"group": 1, "strides": [], "pads": []},
)
SPARSE_LINEAR = Op(SPARSE_OP, Var("x"), Var("values"), Var("indices"), Var("indptr"), Maybe(Var("b")),
                   name="linear", domain=SPARSE_DOMAIN)
SPARSE_BIAS_ACTIVATION = Op(("BiasGelu", "FastGelu"), Op(SPARSE_OP, Var("x"), Var("values"), Var("indices"), Var("indptr"),
                                                       name="linear", domain=SPARSE_DOMAIN), Var("b"), name="act", domain=MS_DOMAIN)
SPARSE_CONV = Op("Transpose", Op(SPARSE_OP, Op("Transpose", Var("x"), name="entry"), Var("values"), Var("indices"),
                                 Var("indptr"), Maybe(Var("b")), name="linear", domain=SPARSE_DOMAIN), name="back")

# ops whose weights are quantized integers: (domain, op)
QUANTIZED_OPS = {
    ("", "MatMulInteger"), ("", "QLinearMatMul"), ("", "ConvInteger"), ("", "QLinearConv"),
    (MS_DOMAIN, "MatMulIntegerToFloat"), (MS_DOMAIN, "DynamicQuantizeMatMul"), (MS_DOMAIN, "QGemm"),
    (MS_DOMAIN, "MatMulNBits"), (MS_DOMAIN, "MatMulBnb4"), (MS_DOMAIN, "QLinearConv"), (MS_DOMAIN, "QOrderedMatMul"),
}
QUANTIZED_WEIGHT_PRODUCERS = {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}
QUANTIZED_ADVICE = "neurorewrite rewrites float weights: expand the float model, then quantize the expanded one"


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def _graph_input_shape(graph: onnx.GraphProto, name: str) -> tuple[int, ...] | None:
    for value in graph.input:
        if value.name == name and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                return tuple(d.dim_value for d in dims)
    return None


def _weight_shape(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    if index.constant_source(name) == "graph input":
        shape = index.constant_shape(name) if index.alias_root(name) in index.initializers else None
        return shape or _graph_input_shape(index.graph, index.alias_root(name))
    return index.constant_shape(name)


def _bias_fits(shape: tuple[int, ...] | None, out: int) -> bool:
    """A bias adds one value per output feature: shape (out,), (1, out), (1, 1, out), or a scalar."""
    if shape is None:
        return False
    if all(d == 1 for d in shape):
        return True
    return shape[-1] == out and all(d == 1 for d in shape[:-1])


def _weight_problem(index: GraphIndex, node: onnx.NodeProto, i: int, weight: str) -> Reason | None:
    """Why the weight input of a linear-looking node cannot be read as a stored weight (None: it can)."""
    if index.constant_source(weight) is not None:
        return None
    label = node_label(node, i)
    producer = index.producer.get(weight)
    if producer is None:
        return Reason("weight-not-constant", f"weight {weight} of {label} is not a constant")
    src = index.graph.node[producer]
    if src.op_type in QUANTIZED_WEIGHT_PRODUCERS:
        return Reason("quantized", f"{label} reads a quantized weight ({src.op_type} node {node_label(src, producer)}); "
                      + QUANTIZED_ADVICE)
    return Reason("weight-not-constant", f"weight {weight} of {label} is computed by {src.op_type} node "
                  f"{node_label(src, producer)}, not stored as a constant")


def _from_match(index: GraphIndex, m: Match, op: str) -> Linear | None:
    """The Linear a matched form describes, or None when its shapes do not make it one."""
    i = m.named["linear"]
    node = index.graph.node[i]
    shape = _weight_shape(index, m["w"])
    kernel: tuple[int, ...] = ()
    if op == "Conv":
        if shape is None or len(shape) < 3 or any(d != 1 for d in shape[2:]):
            return None
        kernel, shape = tuple(shape[2:]), tuple(shape[:2])
    if shape is None or len(shape) != 2:
        return None
    out_in = op == "Conv" or bool(get_attr(node, "transB", 0))
    out, inp = (shape[0], shape[1]) if out_in else (shape[1], shape[0])
    bias = m.get("b") or None
    if bias is not None and not (_weight_shape(index, bias) == (out,) if op == "Conv" else _bias_fits(_weight_shape(index, bias), out)):
        return None
    add = m.named.get("add")
    act = m.named.get("act")
    output = index.graph.node[add].output[0] if add is not None else node.output[0]
    return Linear(
        node=i, name=node_label(node, i), op=op, data_input=m["x"], weight=m["w"], weight_out_in=out_in, bias=bias,
        add_node=add, output=output, in_features=inp, out_features=out,
        scale=float(get_attr(node, "alpha", 1.0)) if op in ("Gemm", "FusedMatMul") else 1.0,
        bias_scale=float(get_attr(node, "beta", 1.0)) if op == "Gemm" else 1.0,
        bias_node=act, feature_axis=1 if op == "Conv" else -1, kernel=kernel,
    )


def _constant_bias(index: GraphIndex, m: Match) -> bool:
    return index.constant_source(m["b"]) in ("initializer", "constant")


def _matmul_linear(index: GraphIndex, i: int, node: onnx.NodeProto) -> Linear | None:
    """``MatMul`` (or ``FusedMatMul``) plus the bias its one consumer adds (an ``Add``, or a
    BiasGelu/FastGelu), if any."""
    out = node.output[0]
    fused = node.op_type == "FusedMatMul"
    forms = [(FUSED_MATMUL_ADD, "FusedMatMul")] if fused else [(MATMUL_ADD, "MatMul+Add"), (MATMUL_BIAS_ACTIVATION, "MatMul")]
    users = index.consumers.get(out, [])
    if len(users) == 1 and out not in index.graph_outputs:
        user = index.graph.node[users[0]]
        for form, op in forms:
            m = match(index, form, user.output[0]) if user.output else None
            if m and m.named["linear"] == i and _constant_bias(index, m):
                lin = _from_match(index, m, op)
                if lin is not None:
                    return lin
    m = match(index, FUSED_MATMUL if fused else MATMUL, out)
    return _from_match(index, m, "FusedMatMul" if fused else "MatMul") if m else None


def _channels_last_sparse(index: GraphIndex, i: int, node: onnx.NodeProto) -> Match | None:
    """``Transpose(channels last) -> SparseLinear -> Transpose(back)``: a 1x1 Conv in the sparse format."""
    users = index.consumers.get(node.output[0], [])
    if len(users) != 1:
        return None
    m = match(index, SPARSE_CONV, index.graph.node[users[0]].output[0])
    if not m or m.named["linear"] != i:
        return None
    to_last = list(get_attr(index.graph.node[m.named["entry"]], "perm", []))
    rank = len(to_last)
    if rank < 3 or to_last != [0, *range(2, rank), 1]:
        return None
    if list(get_attr(index.graph.node[m.named["back"]], "perm", [])) != [0, rank - 1, *range(1, rank - 1)]:
        return None
    return m


def _sparse_linear(index: GraphIndex, i: int, node: onnx.NodeProto) -> Linear | None:
    conv = _channels_last_sparse(index, i, node)
    m = conv or match(index, SPARSE_LINEAR, node.output[0])
    if not m:
        return None
    back = m.named.get("back")
    rank = len(get_attr(index.graph.node[m.named["entry"]], "perm", [])) if conv else 0
    bias, act = m.get("b") or None, None
    if bias is None and not conv:
        users = index.consumers.get(node.output[0], [])
        if len(users) == 1 and node.output[0] not in index.graph_outputs:
            # a bias an onnxruntime activation adds (BiasGelu, FastGelu) stays there in every format
            found = match(index, SPARSE_BIAS_ACTIVATION, index.graph.node[users[0]].output[0])
            if found and found.named["linear"] == i and _constant_bias(index, found) \
                    and _bias_fits(_weight_shape(index, found["b"]), int(get_attr(node, "out_features", -1))):
                bias, act = found["b"], users[0]
    return Linear(
        node=i, name=node_label(node, i), op="SparseLinear", data_input=m["x"], weight=m["values"], weight_out_in=True,
        bias=bias, add_node=None, bias_node=act,
        output=node.output[0] if back is None else index.graph.node[back].output[0],
        in_features=int(get_attr(node, "in_features", -1)), out_features=int(get_attr(node, "out_features", -1)),
        read_only=True, feature_axis=1 if conv else -1, kernel=(1,) * (rank - 2) if conv else (),
        entry=m.named.get("entry"),
    )


FORMS = {"Gemm": (GEMM, "Gemm"), "Conv": (CONV_1X1, "Conv")}


def scan_linears(index: GraphIndex) -> LinearScan:
    """Every linear layer of the main graph (keyed by the index of its Gemm/MatMul/Conv/... node), and
    the linear-looking nodes refused with a reason."""
    from neurorewrite.rewriter import stored  # reads back the grouped format; it builds on this module

    scan = LinearScan()
    for i, node in enumerate(index.graph.node):
        domain, op = _domain(node), node.op_type
        if (domain, op) in QUANTIZED_OPS:
            scan.refused[i] = Refused(i, node_label(node, i), node.output[0], Reason(
                "quantized", f"{op} node {node_label(node, i)} has quantized weights; " + QUANTIZED_ADVICE))
            continue
        if not ((domain == "" and op in ("Gemm", "MatMul", "Conv")) or (domain == MS_DOMAIN and op == "FusedMatMul")
                or (domain == SPARSE_DOMAIN and op == SPARSE_OP)):
            continue
        if op != SPARSE_OP and len(node.input) >= 2:
            if index.constant_source(node.input[0]) in ("initializer", "constant"):
                continue  # a constant times a tensor: not a layer applied to data
            problem = _weight_problem(index, node, i, node.input[1])
            if problem is not None:
                scan.refused[i] = Refused(i, node_label(node, i), node.output[0], problem)
                continue
        if op == "MatMul":
            lin = stored.tied_sum_linear(index, i) or _matmul_linear(index, i, node)
        elif op == "FusedMatMul":
            lin = _matmul_linear(index, i, node)
        elif op == SPARSE_OP:
            lin = _sparse_linear(index, i, node)
        else:
            form, kind = FORMS[op]
            m = match(index, form, node.output[0])
            lin = _from_match(index, m, kind) if m else None
            if lin is not None and lin.bias is not None and not _constant_bias_name(index, lin.bias):
                lin = None
        if lin is not None:
            scan.linears[i] = lin
    _stored_forms(index, scan, stored)
    return scan


def _stored_forms(index: GraphIndex, scan: LinearScan, stored: object) -> None:
    """Add the grouped format's batched linears (read back by :mod:`.stored`), keyed by their MatMul."""
    grouped: dict[str, Linear] = {}
    for i, node in enumerate(index.graph.node):
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            lin = stored.grouped_linear(index, i)  # type: ignore[attr-defined]
            if lin is not None:
                grouped[lin.output] = lin
                scan.linears[lin.node] = lin
    for i, node in enumerate(index.graph.node):
        if grouped and node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            fused = stored.grouped_fused_linear(index, i, grouped)  # type: ignore[attr-defined]
            if fused is not None:
                for part in fused.parts:
                    scan.linears.pop(part.node, None)
                scan.linears[i] = fused


def _constant_bias_name(index: GraphIndex, name: str) -> bool:
    return index.constant_source(name) in ("initializer", "constant", "graph input")


def find_linears(index: GraphIndex) -> dict[int, Linear]:
    """Every linear layer of the main graph, keyed by the index of its Gemm/MatMul/Conv/... node."""
    return scan_linears(index).linears


def features_last(array: np.ndarray, lin: Linear, features: int) -> np.ndarray:
    """``array`` (a tensor ``lin`` reads or writes) as rows of ``features`` values, whatever its feature axis."""
    if lin.feature_axis != -1 and array.ndim > 1:
        array = np.moveaxis(array, lin.feature_axis, -1)
    return array.reshape(-1, features)


def read_weights(index: GraphIndex, lin: Linear) -> tuple[np.ndarray, np.ndarray | None]:
    """The effective ``W`` of shape (out, in) and ``b`` of shape (out,), Gemm alpha/beta folded in."""
    if lin.read_only and lin.op != "SparseLinear":
        from neurorewrite.rewriter.stored import read_stored

        return read_stored(index, lin)
    if lin.op == "SparseLinear":
        csr, bias = read_sparse_linear(index, lin.node)
        if bias is None and lin.bias_node is not None:
            bias = index.constant_value(lin.bias)
        return csr.to_dense(), None if bias is None else np.asarray(bias).reshape(-1).copy()
    w = index.constant_value(lin.weight)
    if w is None:
        raise ValueError(f"weight {lin.weight} of {lin.name} is not a constant")
    if lin.kernel:
        w = w.reshape(w.shape[0], w.shape[1])
    w = w.T if not lin.weight_out_in else w
    if lin.scale != 1.0:
        w = w * np.asarray(lin.scale, dtype=w.dtype)
    b = None
    if lin.bias is not None:
        raw = index.constant_value(lin.bias)
        if raw is None:
            raise ValueError(f"bias {lin.bias} of {lin.name} is not a constant")
        b = np.broadcast_to(raw.reshape(-1) if raw.size == lin.out_features else raw.reshape(()), (lin.out_features,))
        b = b * np.asarray(lin.bias_scale, dtype=b.dtype) if lin.bias_scale != 1.0 else b.copy()
    return np.ascontiguousarray(w), b
