"""Lift an ONNX graph into a trainable torch module with its FPE masks.

:class:`OnnxGraph` evaluates the graph node by node with the torch ops of
:mod:`neurorewrite.models.onnx_ops`: any number of inputs (float or integer: token ids, attention
masks) and outputs. Every linear layer whose weight (and bias) is a constant used by that layer alone
becomes a :class:`MaskedLinear` holding the effective ``W (out, in)`` and ``b`` (Gemm alpha/beta folded
in), masked to its current nonzero pattern, so training keeps the exact nonzero count; ``train``
names the layers whose parameters train (the others are frozen). Everything else is a frozen buffer.
``weights()`` gives the layers' weights back in the form ``rewriter.editor.replace_weights`` takes.

An activation an exporter wrote as a chain of elementwise nodes (GELU as ``Div, Erf, Add, Mul, Mul``, its
tanh form, SiLU as ``x * Sigmoid(x)``: the declared decompositions of
:mod:`neurorewrite.rewriter.activations`) runs as one torch op when its inner tensors are read by
nothing else: the same function, one pass over a tensor that an expanded block makes ``alpha`` times wider
instead of five.

The graph can also be run a stretch at a time (:meth:`OnnxGraph.start`, :meth:`OnnxGraph.advance`):
a :class:`Cursor` holds only the tensors later nodes still read, so a pass can stop before a layer,
change its weights, and go on (``passes/calibrate.py`` refits blocks in graph order this way).

:class:`OnnxMLP` is the one-float-input form ``neurorewrite finetune`` trains on ``(x, y)`` arrays.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn
from torch.nn import functional as F

from neurorewrite.errors import NoBlocksError, UnsupportedModelError, first_line
from neurorewrite.models.fpe import MaskedLinear, linear_arrays
from neurorewrite.models.onnx_ops import OPS
from neurorewrite.models.onnx_ops_tensor import tensor_of
from neurorewrite.rewriter.activations import GELU_ERF, GELU_TANH, SILU
from neurorewrite.rewriter.graph import GraphIndex, node_label
from neurorewrite.rewriter.linear import Linear, find_linears, read_weights
from neurorewrite.rewriter.patterns import MS_DOMAIN, first_match

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class Step:
    """One node to evaluate: ``kind`` is an op name or ``"linear"`` (x W^T + b: a lifted layer, its bias
    Add included)."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict
    layer: str = ""
    node: int = -1  # index of the node in the graph


@dataclass(frozen=True)
class InputSpec:
    name: str
    elem_type: int  # onnx.TensorProto data type
    shape: tuple[int | None, ...]

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES


@dataclass
class Cursor:
    """A run of the graph stopped before step ``position``: the tensors later steps still read."""

    env: dict[str, torch.Tensor | None]
    position: int = 0
    extra: dict[str, object] = field(default_factory=dict)  # what the caller keeps beside it


# linears the "linear" step computes: x W^T + b on the feature axis (the last; a 1x1 Conv's channels)
LIFTED_FORMS = ("Gemm", "MatMul+Add", "MatMul", "Conv")


# the share of a layer's rows below which only its fed rows are multiplied: the gather of the weight's rows and
# the scatter of their outputs cost a pass over each, which a denser layer does not win back
FED_ROWS_SHARE = 0.75


def fed_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``weight`` with a nonzero entry, where they are fewer than ``FED_ROWS_SHARE`` of all (the
    children the global prune left without an input: 4,000-4,500 of each 6,144-wide MiniLM layer at alpha 4)."""
    fed = torch.nonzero(weight.ne(0).any(dim=1)).squeeze(1)
    return fed if len(fed) < FED_ROWS_SHARE * len(weight) else None


def linear_on_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fed: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b``, multiplying only the ``fed`` rows of ``W`` (all with None): the others are all zero, so
    their output is their bias. The same values, for a fraction of the work."""
    if fed is None:
        return F.linear(x, weight, bias)
    kind = torch.result_type(x, weight)
    out = torch.zeros(*x.shape[:-1], len(weight), dtype=kind, device=x.device) if bias is None else \
        bias.to(kind).expand(*x.shape[:-1], len(weight)).clone()
    return out.index_copy_(-1, fed, F.linear(x, weight[fed], None if bias is None else bias[fed]))


def _trainable(index: GraphIndex, lin: Linear, tied: Collection[int] = ()) -> bool:
    return _not_trainable_because(index, lin, tied) is None


def _not_trainable_because(index: GraphIndex, lin: Linear, tied: Collection[int] = ()) -> str | None:
    """Why the lifter cannot train ``lin`` (None when it can). A layer in ``tied`` (node indices, see
    :func:`tied_layers`) reads weights that only other layers of its tie read."""
    if lin.read_only:
        return f"it is stored as {lin.op}, which is read, not trained"
    if lin.op not in LIFTED_FORMS or lin.bias_node is not None:
        return f"its form ({lin.op}{', bias added by another node' if lin.bias_node is not None else ''}) is not lifted"
    for what, name in (("weight", lin.weight), ("bias", lin.bias)):
        if name is None:
            continue
        if index.constant_source(name) not in ("initializer", "constant"):
            return f"its {what} {name} is computed, not a constant"
        readers = len(index.consumers.get(name, [])) + (name in index.graph_outputs)
        if readers > 1 and lin.node not in tied:
            return f"its {what} {name} is read by {readers} nodes (a shared weight: training one reader would change the others)"
    return None


def tied_layers(index: GraphIndex, linears: Iterable[Linear]) -> dict[int, int]:
    """Node of each linear that reads the weight and bias (through Identity copies) an earlier one reads,
    the same way, where nothing but such linears reads them (ALBERT's shared layer run several times) ->
    the earlier linear's node. The lifter makes them one layer: training sums the gradients of every use."""
    groups: dict[tuple, list[Linear]] = {}
    for lin in linears:
        if lin.op in LIFTED_FORMS and lin.bias_node is None and not lin.read_only:
            bias = None if lin.bias is None else index.alias_root(lin.bias)
            key = (index.alias_root(lin.weight), bias, lin.op, lin.weight_out_in, lin.scale, lin.bias_scale, lin.kernel,
                   lin.feature_axis)
            groups.setdefault(key, []).append(lin)
    tied: dict[int, int] = {}
    for (weight, bias, *_), group in groups.items():
        if len(group) < 2 or index.readers(weight) != (sorted(lin.node for lin in group), 0):
            continue
        if bias is not None and index.readers(bias) != (sorted(lin.bias_holder for lin in group), 0):
            continue
        tied.update({lin.node: group[0].node for lin in group[1:]})
    return tied


def _needed_nodes(index: GraphIndex, tensors: Collection[str]) -> set[int]:
    """The nodes that ``tensors`` depend on (subgraph readers included)."""
    reads: dict[int, list[str]] = {}
    for name, users in index.consumers.items():
        for user in users:
            reads.setdefault(user, []).append(name)
    needed: set[int] = set()
    stack = [index.producer[t] for t in tensors if t in index.producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(index.producer[t] for t in reads.get(i, ()) if t in index.producer)
    return needed


FUSED_ACTIVATIONS = {  # a declared decomposition -> the torch op that computes it in one pass
    "gelu": (GELU_ERF, F.gelu),
    "gelu_tanh": (GELU_TANH, lambda x: F.gelu(x, approximate="tanh")),
    "silu": (SILU, F.silu),
}


def _fused_activations(index: GraphIndex, nodes: Collection[int], taken: Collection[int],
                       outputs: Collection[str]) -> dict[int, Step]:
    """Per covered node, the one step that replaces a decomposed activation among ``nodes``: at its
    last node the fused step, at the others a ``fused`` placeholder. A chain qualifies when all its
    nodes are among ``nodes`` and not in ``taken``, and no tensor inside it is read elsewhere or asked
    for (``outputs``)."""
    patterns = [(name, pattern) for name, (pattern, _) in FUSED_ACTIVATIONS.items()]
    asked = set(outputs)
    steps: dict[int, Step] = {}
    for i in sorted(nodes):
        node = index.graph.node[i]
        if i in steps or i in taken or node.op_type != "Mul" or len(node.output) != 1:
            continue
        name, m = first_match(index, patterns, node.output[0])
        if not m or len(m.nodes) < 2 or any(j not in nodes or j in taken or j in steps for j in m.nodes):
            continue
        if asked & {o for j in m.nodes if j != i for o in index.graph.node[j].output}:
            continue
        for j in m.nodes:
            steps[j] = Step("fused", (), (), {}, node=j)
        steps[i] = Step("activation", (m["x"],), (node.output[0],), {"fn": name}, node=i)
    return steps


def _attrs(node: onnx.NodeProto) -> dict:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs["_outputs"] = len(node.output)
    return attrs


class OnnxGraph(nn.Module):
    """The function of an ONNX graph as a torch module; ``forward`` takes the inputs in graph order
    and returns the first output (:meth:`run` returns any tensors by name)."""

    def __init__(self, model: onnx.ModelProto, where: str = "model", train: Collection[str] | None = None,
                 outputs: Collection[str] | None = None) -> None:
        super().__init__()
        graph = model.graph
        index = GraphIndex.build(graph)
        self.output_names = list(outputs) if outputs is not None else [o.name for o in graph.output]
        self._needed = _needed_nodes(index, self.output_names)
        inits = {t.name for t in graph.initializer}
        self.inputs = [
            InputSpec(i.name, i.type.tensor_type.elem_type,
                      tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim))
            for i in graph.input if i.name not in inits
        ]
        self.layers = nn.ModuleDict()
        self.linears: dict[str, Linear] = {}
        lifted = self._lift_linears(index, where, train)
        self._constants: dict[str, str] = {}
        self._lift_constants(index)
        self.steps = self._plan(model, index, lifted, where)
        self._where = where
        self._labels = {step.node: node_label(model.graph.node[step.node], step.node) for step in self.steps
                        if step.node >= 0}
        self._last_read = self._reads()
        self._last_use = {**self._last_read, **{name: len(self.steps) for name in self.output_names}}
        self._fed_cache: dict[str, tuple[torch.Tensor, int, torch.Tensor | None]] = {}

    # --- building -------------------------------------------------------------------------------

    def _lift_linears(self, index: GraphIndex, where: str, train: Collection[str] | None) -> dict[int, Step]:
        """One layer per linear, except tied ones (:func:`tied_layers`), which are one layer under several keys."""
        steps: dict[int, Step] = {}
        linears = list(find_linears(index).values())
        tied = tied_layers(index, linears)
        tied_nodes = set(tied) | set(tied.values())
        key_of_node: dict[int, str] = {}
        for lin in linears:
            if not _trainable(index, lin, tied_nodes):
                continue
            key = f"linear{len(self.linears)}"
            key_of_node[lin.node] = key
            if lin.node in tied:
                layer = self.layers[key_of_node[tied[lin.node]]]
            else:
                layer = MaskedLinear.from_arrays(*read_weights(index, lin))
                layer.requires_grad_(False)
            if train is None or lin.name in train:  # a tied layer trains when any of its uses is to be trained
                layer.requires_grad_(True)
            self.layers[key] = layer
            self.linears[key] = lin
            # a MatMul's bias Add reads nothing else (find_linears checks it): one fused step writes the output
            steps[lin.node] = Step("linear", (lin.data_input,), (lin.output,), {"axis": lin.feature_axis}, key, lin.node)
            if lin.add_node is not None:
                steps[lin.add_node] = Step("fused", (), (), {}, key, lin.add_node)
        if not self.layers:
            raise NoBlocksError(f"{where}: no linear layer with constant, unshared weights to fine-tune")
        if train is not None:
            missing = sorted(set(train) - {lin.name for lin in self.linears.values()})
            if missing:
                found = {lin.name: lin for lin in find_linears(index).values()}
                reasons = [f"{name} ({_not_trainable_because(index, found[name], tied_nodes) or 'not lifted'})" if name in found
                           else f"{name} (not a linear layer)" for name in missing[:3]]
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise UnsupportedModelError(f"{where}: cannot train layer(s) {'; '.join(reasons)}{more}")
        return steps

    def _lift_constants(self, index: GraphIndex) -> None:
        trained = {n for lin in self.linears.values() for n in (lin.weight, lin.bias) if n}
        in_layers = {i for lin in self.linears.values() for i in lin.nodes}
        for name in list(index.initializers) + list(index.constant_nodes):
            # a layer's parameter holds it; another reader (an Identity copy a shared layer reads) needs it too
            if name in trained and set(index.consumers.get(name, ())) <= in_layers:
                continue
            value = index.constant_value(name)
            if value is None:
                continue
            key = f"const{len(self._constants)}"
            self.register_buffer(key, tensor_of(value), persistent=False)
            self._constants[name] = key

    def _plan(self, model: onnx.ModelProto, index: GraphIndex, lifted: dict[int, Step], where: str) -> list[Step]:
        lifted = {**_fused_activations(index, self._needed, lifted, self.output_names), **lifted}
        steps, unsupported, fused = [], [], False
        for i, node in enumerate(model.graph.node):
            if i not in self._needed:
                continue  # nothing asked for reads it (e.g. a classifier's label after the probabilities)
            if i in lifted:
                if lifted[i].kind != "fused":
                    steps.append(lifted[i])
            elif node.op_type == "Constant" and node.output[0] in index.constant_nodes:
                continue  # its value is a buffer or, for a trained linear, the layer's parameter
            elif node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                unsupported.append(f"{node.op_type} ({node_label(node, i)})")
                fused |= node.domain == MS_DOMAIN
            else:
                steps.append(Step(node.op_type, tuple(node.input), tuple(node.output), _attrs(node), node=i))
        if unsupported:
            more = f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else ""
            hint = ("; com.microsoft nodes are onnxruntime's fusions: run this on the model as exported, before"
                    " onnxruntime's transformer optimizer") if fused else ""
            raise UnsupportedModelError(
                f"{where}: cannot lift into torch: unsupported node(s) {', '.join(unsupported[:8])}{more}{hint}"
            )
        return steps

    def _reads(self) -> dict[str, int]:
        """The last step that reads each tensor."""
        last: dict[str, int] = {}
        for k, step in enumerate(self.steps):
            for name in step.inputs:
                last[name] = k
        return last

    # --- running --------------------------------------------------------------------------------

    def _feeds(self, args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        if len(args) != len(self.inputs):
            raise UnsupportedModelError(f"the graph has {len(self.inputs)} inputs, got {len(args)} tensors")
        return {spec.name: value for spec, value in zip(self.inputs, args)}

    def start(self, feeds: Mapping[str, torch.Tensor]) -> Cursor:
        """A cursor before the first step, holding ``feeds`` (graph input name -> tensor)."""
        return Cursor(dict(feeds))

    def advance(self, cursor: Cursor, until: int | None = None) -> Cursor:
        """Run steps ``cursor.position .. until - 1`` (all by default), dropping tensors no later step reads."""
        stop = len(self.steps) if until is None else until
        env = cursor.env
        for k in range(cursor.position, stop):
            self._execute(self.steps[k], env)
            for name in self.steps[k].inputs:
                if self._last_use.get(name, -1) == k and name in env:
                    del env[name]
        cursor.position = max(cursor.position, stop)
        return cursor

    def release(self, cursor: Cursor) -> None:
        """Drop from ``cursor`` the tensors no step from its position on reads, graph outputs included:
        for a caller that reads the outputs as they are written (calibration reads each block's output
        at its block; kept to the end, they add up to a residual stream per block and chunk)."""
        for name in [n for n in cursor.env if self._last_read.get(n, -1) < cursor.position]:
            del cursor.env[name]

    def run_steps(self, env: dict[str, torch.Tensor | None], steps: Sequence[Step],
                  keep: Collection[str] | None = None) -> dict[str, torch.Tensor | None]:
        """Run ``steps`` (from :meth:`steps_of_nodes`) in order on ``env``; returns ``env``. For a stretch
        of the graph that reads only what ``env`` holds, e.g. one MLP block. With ``keep``, every other
        tensor the steps write is dropped after its last read among them (a wide block's intermediates are big)."""
        last: dict[str, int] = {}
        if keep is not None:
            for position, step in enumerate(steps):
                for name in step.inputs:
                    last[name] = position
        for position, step in enumerate(steps):
            self._execute(step, env)
            if keep is not None:
                for name in step.inputs:
                    if last.get(name) == position and name not in keep and name in env:
                        del env[name]
        return env

    def steps_of_nodes(self, nodes: Collection[int], as_identity: Collection[int] = ()) -> list[Step]:
        """The steps that evaluate the graph nodes ``nodes``, in order.

        The nodes in ``as_identity`` (shape-only nodes that keep the last axis last) run as Identity: a
        block run on rows ``(R, features)`` has no batch and sequence axes for its Reshapes to rebuild, and
        their targets may be computed outside the block (GPT-2's Conv1D: from the Shape of its input)."""
        wanted, same = set(nodes), set(as_identity)
        return [Step("Identity", step.inputs[:1], step.outputs[:1], {}, node=step.node) if step.node in same else step
                for step in self.steps if step.node in wanted]

    def _execute(self, step: Step, env: dict[str, torch.Tensor | None]) -> None:
        try:
            self._compute(step, env)
        except RuntimeError as e:  # torch refuses the op: the graph's own types or shapes do not fit together
            if isinstance(e, torch.OutOfMemoryError) or "not enough memory" in str(e):
                raise  # the machine, not the model
            raise UnsupportedModelError(
                f"{self._where}: node {self._labels.get(step.node, step.kind)} ({step.kind}) cannot run on these "
                f"inputs: {first_line(e)}; do the model's declared types and shapes fit its nodes (is the file damaged?)"
            ) from e

    def _compute(self, step: Step, env: dict[str, torch.Tensor | None]) -> None:
        if step.kind == "linear":
            layer = self.layers[step.layer]
            x, axis = env[step.inputs[0]], step.attrs["axis"]
            # without autograd a layer with mostly empty rows multiplies only the others
            graded = torch.is_grad_enabled() and (layer.weight.requires_grad or x.requires_grad)
            fed = None if graded else self._fed_rows(step.layer)
            if axis != -1:  # a 1x1 Conv mixes the channel axis
                env[step.outputs[0]] = linear_on_rows(x.movedim(axis, -1), layer.weight, layer.bias, fed).movedim(-1, axis)
                return
            env[step.outputs[0]] = linear_on_rows(x, layer.weight, layer.bias, fed)
            return
        if step.kind == "activation":
            env[step.outputs[0]] = FUSED_ACTIVATIONS[step.attrs["fn"]][1](self._value(env, step.inputs[0]))
            return
        args = [self._value(env, n) for n in step.inputs]
        out = OPS[step.kind](args, step.attrs)
        if isinstance(out, tuple):
            for name, value in zip(step.outputs, out):
                if name:
                    env[name] = value
        else:
            env[step.outputs[0]] = out

    def _fed_rows(self, key: str) -> torch.Tensor | None:
        """:func:`fed_rows` of a layer's weight, found again only after the weight changed in place (its
        version counter moved) or was replaced: the scan costs ~2 ms per 6144 x 384 weight, per call."""
        weight = self.layers[key].weight
        cached = self._fed_cache.get(key)  # the weight itself, not its id: a freed id can come back
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            cached = (weight, weight._version, fed_rows(weight.detach()))
            self._fed_cache[key] = cached
        return cached[2]

    def _value(self, env: dict[str, torch.Tensor | None], name: str) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        key = self._constants.get(name)
        if key is None:
            raise KeyError(name)
        return getattr(self, key)

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All graph outputs by name."""
        cursor = self.advance(self.start(feeds))
        return {name: cursor.env[name] for name in self.output_names}  # type: ignore[misc]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.run(self._feeds(args))[self.output_names[0]]

    # --- layers ---------------------------------------------------------------------------------

    def step_of(self, tensor: str) -> int:
        """The index of the step that writes ``tensor``."""
        for k, step in enumerate(self.steps):
            if tensor in step.outputs:
                return k
        raise KeyError(tensor)

    def key_of(self, linear_name: str) -> str:
        """The :attr:`layers` key of the lifted linear named ``linear_name``."""
        for key, lin in self.linears.items():
            if lin.name == linear_name:
                return key
        raise KeyError(linear_name)

    def weights(self, keys: Collection[str] | None = None) -> list[tuple[Linear, np.ndarray, np.ndarray | None]]:
        """``(linear, W (out, in), b)`` of every lifted layer (or those of ``keys``), masks applied and
        support restored."""
        out = []
        for key, lin in self.linears.items():
            if keys is not None and key not in keys:
                continue
            layer = self.layers[key]
            layer.apply_mask()
            layer.restore_support()
            out.append((lin, *linear_arrays(layer)))
        return out


class OnnxMLP(OnnxGraph):
    """An :class:`OnnxGraph` with exactly one float input (what ``finetune`` on ``(x, y)`` trains)."""

    def __init__(self, model: onnx.ModelProto, where: str = "model", train: Collection[str] | None = None) -> None:
        super().__init__(model, where, train)
        if len(self.inputs) != 1 or not self.inputs[0].is_float:
            raise UnsupportedModelError(f"{where}: fine-tuning on x needs exactly one float graph input, found {len(self.inputs)}")
        self.input_name = self.inputs[0].name
        self.input_shape = self.inputs[0].shape
        self.output_name = self.output_names[0]
