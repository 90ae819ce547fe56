"""A torch module's data flow as a small op graph, for finding its MLP blocks.

:func:`trace_ops` traces ``model`` with ``torch.fx`` (no inputs needed; works for ``nn.Sequential``
and most hand-written ``forward``\\ s) and, where fx cannot trace it (Hugging Face models: Python
control flow on shapes and flags), with ``torch.export`` on the example inputs the caller passes.
Both traces become one :class:`OpGraph` in execution order:

- every call of a linear-like module (``nn.Linear`` and its subclasses, Hugging Face's ``Conv1D``,
  whose weight is stored ``(in, out)``) is ONE ``linear`` op, whatever ops it runs inside (``Conv1D``
  is ``view -> addmm -> view``); torch.export's ``nn_module_stack`` tells which module a node ran in;
- every other op gets a canonical name (``relu``, ``gelu``, ``mul``, ...: ``aten.gelu.default``,
  ``F.gelu``, ``Tensor.gelu`` and ``nn.GELU`` all become ``gelu``) and a kind: ``unary`` (acts per
  element), ``binary`` (per element with broadcasting), ``pass`` (identity at inference: dropout,
  dtype casts, ``contiguous``), ``ignore`` (run-time asserts that return nothing) or ``other``;
- operands that are constants of one element (Python numbers, 0-d buffers, lifted tensor
  constants) are marked scalar (``None``); larger constants become ``const`` ops.

Nothing here changes the model; the matcher is :mod:`neurorewrite.models.module_blocks`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from neurorewrite.errors import UnsupportedModelError

UNARY = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh", "softplus",
    "softsign", "hardtanh", "hardsigmoid", "hardswish", "tanhshrink", "erf", "exp", "log", "sqrt", "rsqrt", "neg",
    "abs", "reciprocal", "clamp", "clamp_min", "clamp_max", "square", "logsigmoid", "log_sigmoid", "threshold",
    "sin", "cos", "sign", "expm1", "log1p", "sinh", "cosh",
})
BINARY = frozenset({"add", "sub", "rsub", "mul", "div", "pow", "maximum", "minimum", "fmax", "fmin"})
PASS = frozenset({
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "identity", "to", "type", "float",
    "half", "bfloat16", "double", "contiguous", "clone", "detach", "alias", "type_as", "_to_copy",
})
ALIASES = {
    "truediv": "div", "true_divide": "div", "multiply": "mul", "subtract": "sub", "iadd": "add", "imul": "mul",
    "isub": "sub", "itruediv": "div", "relu6": "relu6", "hardtanh_": "hardtanh", "clip": "clamp",
    "log_sigmoid_forward": "log_sigmoid", "gelu_tanh": "gelu",
}
# nn activation modules (fx leaves) and their canonical op
MODULE_OPS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Softplus: "softplus", nn.Softsign: "softsign", nn.Hardtanh: "hardtanh", nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish", nn.Tanhshrink: "tanhshrink", nn.LogSigmoid: "logsigmoid", nn.Threshold: "threshold",
    nn.Identity: "identity", nn.Dropout: "dropout", nn.AlphaDropout: "alpha_dropout",
}
IGNORED_PREFIXES = ("_assert", "sym_constrain", "_functional_assert")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear whose weight is stored ``(in, out)``. Recognised by
    name and shape so that transformers need not be imported."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_linear(module: nn.Module) -> bool:
    """A module ``fpe_expand`` can widen: ``nn.Linear`` (``MaskedLinear`` included) or HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def kind_of(name: str) -> str:
    if name in UNARY:
        return "unary"
    if name in BINARY:
        return "binary"
    if name in PASS:
        return "pass"
    if name.startswith(IGNORED_PREFIXES):
        return "ignore"
    return "other"


@dataclass
class Op:
    """One op of the traced forward. ``args``: tensor operands, as op indices (``None`` for a scalar
    constant). ``name``: the canonical op name, or the module path for a ``linear``."""

    index: int
    kind: str  # input, const, linear, unary, binary, pass, ignore, other
    name: str
    args: tuple[int | None, ...] = ()
    label: str = ""  # what a message calls it
    detail: str = ""  # e.g. "tanh" for gelu(approximate="tanh")
    params: tuple[object, ...] = ()  # the call's positional arguments, tensors as None (chunk: (None, 2, -1))
    options: dict[str, object] = field(default_factory=dict)  # its keyword arguments that are not tensors
    rank: int | None = None  # rank of the first tensor operand, where the trace knows it


@dataclass
class OpGraph:
    """The ops in execution order, their users, and the ops whose value leaves the forward."""

    tracer: str
    ops: list[Op] = field(default_factory=list)
    users: dict[int, list[int]] = field(default_factory=dict)
    outputs: set[int] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)  # linear module path -> calls in one forward

    def add(self, kind: str, name: str, args: tuple[int | None, ...] = (), label: str = "", detail: str = "",
            node: fx.Node | None = None) -> int:
        params: tuple[object, ...] = ()
        options: dict[str, object] = {}
        rank = None
        if node is not None:
            params = tuple(None if isinstance(a, fx.Node) else a for a in node.args)
            options = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
            first = next((a for a in node.args if isinstance(a, fx.Node)), None)
            value = None if first is None else first.meta.get("val")
            rank = value.dim() if isinstance(value, torch.Tensor) else None
        op = Op(len(self.ops), kind, name, args, label or name, detail, params, options, rank)
        self.ops.append(op)
        for a in dict.fromkeys(a for a in args if a is not None):
            self.users.setdefault(a, []).append(op.index)
        return op.index

    def set_input(self, index: int, arg: int) -> None:
        """Give op ``index``, which has none yet, its one tensor operand ``arg``."""
        self.ops[index].args = (arg,)
        self.users.setdefault(arg, []).append(index)

    def linears(self) -> Iterator[Op]:
        return (op for op in self.ops if op.kind == "linear")


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name.endswith("_") and not name.startswith("_"):  # in-place variants: relu_, add_
        name = ALIASES.get(name[:-1], name[:-1])
    return name


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _tensor_numel(value: object) -> int | None:
    return value.numel() if isinstance(value, torch.Tensor) else None


class _LinearLeafTracer(fx.Tracer):
    """fx tracer that keeps linear-like modules (HF Conv1D too) as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_linear(m) or super().is_leaf_module(m, module_qualified_name)


def trace_ops(model: nn.Module, example_inputs: Any = None) -> OpGraph:
    """``model``'s op graph by torch.fx, else by torch.export on ``example_inputs`` (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs). Raises :class:`UnsupportedModelError` naming both
    failures when neither works."""
    try:
        graph = _LinearLeafTracer().trace(model)
    except Exception as fx_error:  # fx raises many types (TraceError, ValueError, TypeError, ...)
        if example_inputs is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: torch.fx cannot trace its forward ({type(fx_error).__name__}: "
                f"{str(fx_error).splitlines()[0] if str(fx_error) else ''}); pass example_inputs=... to fpe_expand "
                "so that it can follow the data flow with torch.export"
            ) from fx_error
        return _from_export(model, example_inputs, fx_error)
    return _from_fx(model, graph)


# --- torch.fx ------------------------------------------------------------------------------------------


def _from_fx(model: nn.Module, graph: fx.Graph) -> OpGraph:
    out = OpGraph("torch.fx")
    ids: dict[fx.Node, int | None] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            ids[node] = out.add("input", node.name)
        elif node.op == "get_attr":
            value = _fetch(model, str(node.target))
            ids[node] = None if _tensor_numel(value) == 1 or not isinstance(value, torch.Tensor) else out.add(
                "const", str(node.target))
        elif node.op == "output":
            out.outputs |= {ids[a] for a in _node_args(node) if ids.get(a) is not None}  # type: ignore[misc]
        elif node.op == "call_module":
            ids[node] = _fx_module(out, model, node, ids)
        else:  # call_function, call_method
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            name = canonical(str(target))
            args = tuple(ids[a] for a in _node_args(node))
            detail = str(node.kwargs.get("approximate", "")) if name == "gelu" else ""
            ids[node] = out.add(kind_of(name), name, args, label=_label(name, node.name), detail=detail, node=node)
    return out


def _fx_module(out: OpGraph, model: nn.Module, node: fx.Node, ids: dict[fx.Node, int | None]) -> int:
    path = str(node.target)
    module = model.get_submodule(path)
    args = tuple(ids[a] for a in _node_args(node))
    if is_linear(module):
        out.calls[path] += 1
        return out.add("linear", path, args[:1], label=path)
    name = next((op for cls, op in MODULE_OPS.items() if type(module) is cls), None)
    if name is None:
        return out.add("other", type(module).__name__, args, label=f"{type(module).__name__} module {path}")
    detail = str(getattr(module, "approximate", "")) if name == "gelu" else ""
    return out.add(kind_of(name), name, args, label=f"{type(module).__name__} module {path}", detail=detail)


def _label(op: str, node: str) -> str:
    """``mul_12``, or ``view (h_3)`` when the node's name does not say what it is."""
    return node if node.startswith(op) else f"{op} ({node})"


def _fetch(model: nn.Module, target: str) -> object:
    value: object = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


# --- torch.export --------------------------------------------------------------------------------------


def _from_export(model: nn.Module, example_inputs: Any, fx_error: BaseException) -> OpGraph:
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise UnsupportedModelError(
            f"{type(model).__name__}: neither torch.fx ({type(fx_error).__name__}) nor torch.export "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) can trace its forward on the "
            "example inputs; fpe_expand needs one of them to follow the data flow"
        ) from e
    return _export_graph(model, exported)


def _linear_call(model: nn.Module, node: fx.Node, cache: dict[str, bool]) -> tuple[str, str] | None:
    """(call key, module path) of the outermost linear-like module this node ran inside, if any."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if path not in cache:
            try:
                cache[path] = is_linear(model.get_submodule(path)) if path else False
            except AttributeError:
                cache[path] = False
        if cache[path]:
            return key, path
    return None


def _export_graph(model: nn.Module, exported: torch.export.ExportedProgram) -> OpGraph:
    sig = exported.graph_signature
    constants = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    out = OpGraph("torch.export")
    ids: dict[fx.Node, int | None] = {}
    constant_nodes: set[fx.Node] = set()
    groups: dict[str, int] = {}  # linear call key -> op
    cache: dict[str, bool] = {}
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            if node.name in constants:
                constant_nodes.add(node)
                numel = _tensor_numel(node.meta.get("val"))
                ids[node] = None if numel == 1 else out.add("const", constants[node.name])
            else:
                ids[node] = out.add("input", node.name)
            continue
        if node.op == "output":
            out.outputs |= {ids[a] for a in _node_args(node) if ids.get(a) is not None}  # type: ignore[misc]
            continue
        operands = _node_args(node)
        call = _linear_call(model, node, cache) if node.op == "call_function" else None
        if call is not None:
            key, path = call
            # the call's data input: the first operand that is neither a constant nor made inside the call
            # (a linear written as ``x @ self.weight.T``, Falcon's, first transposes its weight)
            data = [ids[a] for a in operands if a not in constant_nodes and ids.get(a) is not None
                    and ids[a] != groups.get(key)]
            if key not in groups:
                out.calls[path] += 1
                groups[key] = out.add("linear", path, tuple(data[:1]), label=path)
            elif data and not out.ops[groups[key]].args:
                out.set_input(groups[key], data[0])
            ids[node] = groups[key]
            continue
        if operands and all(a in constant_nodes for a in operands):  # computed from constants only
            constant_nodes.add(node)
            numel = _tensor_numel(node.meta.get("val"))
            ids[node] = None if numel == 1 else out.add("const", node.name)
            continue
        target = node.target
        raw = target._schema.name.split("::")[-1] if hasattr(target, "_schema") else getattr(target, "__name__", str(target))
        name = canonical(raw)
        detail = str(node.kwargs.get("approximate", "")) if name == "gelu" else ""
        ids[node] = out.add(kind_of(name), name, tuple(ids[a] for a in operands), label=_label(raw, node.name),
                            detail=detail, node=node)
    return out
