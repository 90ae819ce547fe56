"""The one graph editor: every pass that changes a graph says what to change here, then applies it once.

:class:`GraphEditor` collects edits against an input model (nodes emitted in place of a node index,
nodes removed, new weights for linear layers, initializers added or dropped, tensors whose shape
changed, opset imports added or removed) and :meth:`GraphEditor.apply` builds a NEW model from them.
The input model is never modified, and weights about to be replaced are never copied.

Node order is kept: nodes that replace a node are emitted where it was, so a topologically sorted
graph stays sorted. Every created node and tensor gets a name no other node or tensor has.
A new constant made twice from one source (the same base name or source key, the same contents) is
stored once (:meth:`GraphEditor.const`): blocks that read one set of weights (ALBERT's shared layers)
keep reading one set after any rewrite. Equal contents from different sources (children's equal bias
shares, or one bias two layers with different weights read) stay separate parameters.

Operators whose signature changed between opsets (``ReduceSum``'s and ``Split``'s axes moved from an
attribute to an input in opset 13) are built by :meth:`GraphEditor.reduce_sum` and
:meth:`GraphEditor.split`, the one place that knows it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from neurorewrite.external_data import make_tensor
from neurorewrite.external_data.common import _copy_fields
from neurorewrite.rewriter.graph import GraphIndex, names_used_in
from neurorewrite.rewriter.linear import Linear
from neurorewrite.rewriter.record import FPERecord, write_record


@dataclass(frozen=True)
class NewWeights:
    """Effective weights for one linear layer: ``w`` (out, in), ``b`` (out,) or None to keep the bias."""

    linear: Linear
    w: np.ndarray
    b: np.ndarray | None


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken``; added to ``taken``."""
    candidate, n = base, 0
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version (which operator signatures the graph may use)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no nodes, initializers or value_info yet."""
    new = onnx.ModelProto()
    _copy_fields(model, new, skip=("graph",))
    _copy_fields(model.graph, new.graph, skip=("initializer", "value_info", "node"))
    return new


@dataclass
class GraphEditor:
    """Edits to apply to one model; see the module docstring."""

    index: GraphIndex
    taken: set[str]
    opset: int
    emit: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    remove: set[int] = field(default_factory=set)
    new_inits: list[onnx.TensorProto] = field(default_factory=list)
    drop_inits: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)
    opsets: dict[str, int] = field(default_factory=dict)
    drop_opsets: set[str] = field(default_factory=set)
    pending: list[onnx.NodeProto] = field(default_factory=list)
    renames: dict[tuple[int, int], str] = field(default_factory=dict)  # (node index, input slot) -> tensor
    unscaled: set[int] = field(default_factory=set)  # Gemm/FusedMatMul nodes whose alpha/beta become 1
    released: set[str] = field(default_factory=set)  # constants to drop once nothing reads them any more
    by_content: dict[bytes, str] = field(default_factory=dict)  # a new constant's source and contents -> its name

    @classmethod
    def start(cls, model: onnx.ModelProto) -> GraphEditor:
        graph = model.graph
        taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
        return cls(GraphIndex.build(graph), taken, default_opset(model))

    # --- building nodes -------------------------------------------------------------------------

    def name(self, base: str) -> str:
        """A tensor or node name not used in the graph yet."""
        return unique_name(base, self.taken)

    def const(self, base: str, value: np.ndarray, source: str | None = None) -> str:
        """The name of a new initializer holding ``value`` (any layout: it is written in C order), or of
        the one this editor already made from ``source`` (default: ``base``) with the same dtype, shape
        and bytes."""
        value = np.asarray(value)
        key = (source or base).encode() + b"\0" + content_key(value)
        name = self.by_content.get(key)
        if name is None:
            name = self.by_content[key] = self.name(base)
            # make_tensor writes C-order bytes itself (big ones to a spill file): no contiguous copy first
            self.new_inits.append(make_tensor(value, name))
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, domain: str = "", n_out: int = 1,
             outputs: Sequence[str] | None = None, **attrs: object) -> list[str]:
        """Queue a node (collected by :meth:`take`); returns its output names (made up unless given)."""
        outs = list(outputs) if outputs is not None else [
            self.name(f"{base}.{op.lower()}" if n_out == 1 else f"{base}.{op.lower()}{i}") for i in range(n_out)
        ]
        self.pending.append(helper.make_node(op, list(inputs), outs, name=self.name(f"{base}/{op}"), domain=domain, **attrs))
        return outs

    def reduce_sum(self, x: str, axes: Sequence[int], base: str, keepdims: int = 0,
                   output: str | None = None) -> str:
        """``ReduceSum(x, axes)`` in the form the model's opset takes (axes an input from opset 13)."""
        outs = None if output is None else [output]
        if self.opset >= 13:
            axis = self.const(base + ".axes", np.array(list(axes), np.int64))
            return self.node("ReduceSum", [x, axis], base, outputs=outs, keepdims=keepdims)[0]
        return self.node("ReduceSum", [x], base, outputs=outs, axes=list(axes), keepdims=keepdims)[0]

    def split(self, x: str, sizes: Sequence[int], base: str, axis: int = -1) -> list[str]:
        """``Split(x, sizes)`` along ``axis`` in the form the model's opset takes (sizes an input from 13)."""
        sizes = [int(s) for s in sizes]
        if self.opset >= 13:
            return self.node("Split", [x, self.const(base + ".sizes", np.array(sizes, np.int64))], base,
                             n_out=len(sizes), axis=axis)
        return self.node("Split", [x], base, n_out=len(sizes), axis=axis, split=sizes)

    def leading_shape(self, x: str, base: str, tail: Sequence[int]) -> str:
        """``shape(x)[:-1] + tail`` as a tensor (queued nodes), for reshapes that keep the input's rank."""
        shape = self.node("Shape", [x], base)[0]
        zero = self.const(base + ".zero", np.array([0], np.int64))
        last = self.const(base + ".last", np.array([-1], np.int64))
        lead = self.node("Slice", [shape, zero, last], base)[0]
        return self.node("Concat", [lead, self.const(base + ".tail", np.array(list(tail), np.int64))], base, axis=0)[0]

    def take(self) -> list[onnx.NodeProto]:
        """The nodes queued since the last call, in creation order."""
        nodes, self.pending = self.pending, []
        return nodes

    # --- changing what is there ------------------------------------------------------------------

    def replace_node(self, i: int, build: list[onnx.NodeProto]) -> None:
        """Emit ``build`` where node ``i`` was, and drop node ``i``."""
        self.emit[i] = build
        self.remove.add(i)

    def drop_constant(self, name: str) -> None:
        """Forget the constant ``name`` (an initializer, a Constant node's output, or an Identity of one)
        once nothing reads it any more: a tensor other nodes still use is kept for them."""
        self.released.add(name)

    def replace_linear(self, lin: Linear, build: list[onnx.NodeProto]) -> None:
        """Emit ``build`` where ``lin`` was and drop its nodes and weight constants (a bias an activation
        node adds stays while that node reads it)."""
        self.emit[lin.node] = build
        self.remove |= set(lin.nodes)
        for name in (lin.weight, lin.bias):
            if name is not None:
                self.drop_constant(name)

    def set_weights(self, lin: Linear, w: np.ndarray, b: np.ndarray | None) -> list[str]:
        """Make ``lin`` read new effective weights ``w`` (out, in) and ``b`` (None: keep the bias); returns
        the new tensors' names (weight, then bias), for :meth:`share_weights`.

        The new initializers take the stored dtype and layout of the old ones; the layer reads them,
        and the old ones are dropped unless another node still reads them (a shared tensor: the other
        users keep the original, this layer gets its own copy). A Gemm's alpha/beta (a FusedMatMul's
        alpha) become 1 because the new weights are effective weights.
        """
        if lin.read_only:
            raise ValueError(f"{lin.name} is a stored {lin.op} layer; it is read, not rewritten")
        stored = w if lin.weight_out_in else w.T
        if lin.kernel:
            stored = stored.reshape(stored.shape + lin.kernel)
        values = [stored] if b is None or lin.bias is None else [stored, b.reshape(self._bias_shape(lin.bias, b.size))]
        # layers that read one weight tensor and get equal new weights share them (a bias only with its weight)
        root = self.index.alias_root(lin.weight)
        names = [self.const(old + ".fpe", value.astype(self._stored_dtype(old), copy=False), f"{root}/{slot}")
                 for (old, _, slot), value in zip(self._weight_slots(lin, len(values) > 1), values)]
        self.share_weights(lin, names)
        return names

    def share_weights(self, lin: Linear, names: Sequence[str]) -> None:
        """Make ``lin`` read the tensors another layer's :meth:`set_weights` made (``names``: weight, then
        bias when it changed); its old ones are dropped once nothing reads them."""
        if lin.op in ("Gemm", "FusedMatMul"):
            self.unscaled.add(lin.node)
        for (old, node_i, slot), name in zip(self._weight_slots(lin, len(names) > 1), names):
            self.renames[(node_i, slot)] = name
            self.drop_constant(old)

    def _weight_slots(self, lin: Linear, with_bias: bool) -> list[tuple[str, int, int]]:
        """(tensor, node, input slot) of the layer's weight, and of its bias with ``with_bias``."""
        slots = [(lin.weight, lin.node, 1)]
        if with_bias and lin.bias is not None:
            holder = lin.bias_holder
            node = self.index.graph.node[holder]
            slot = 2 if node.op_type == "Gemm" and holder == lin.node else list(node.input).index(lin.bias)
            slots.append((lin.bias, holder, slot))
        return slots

    def rename_input(self, node: int, slot: int, tensor: str) -> None:
        """Make input ``slot`` of node ``node`` read ``tensor`` (the old input is released)."""
        old = self.index.graph.node[node].input[slot]
        self.renames[(node, slot)] = tensor
        if self.index.constant_source(old) in ("initializer", "constant"):
            self.drop_constant(old)

    def _stored_dtype(self, name: str) -> np.dtype:
        dtype = self.index.constant_dtype(name)
        if dtype is None:
            raise ValueError(f"{name} is not a constant")
        return dtype

    def _bias_shape(self, name: str, out: int) -> tuple[int, ...]:
        shape = self.index.constant_shape(name) or (out,)
        return (out,) if all(d == 1 for d in shape) else tuple(shape[:-1]) + (out,)

    # --- the new model -----------------------------------------------------------------------------

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The edited copy of ``model`` (the dropped weights are not copied)."""
        new = model_shell(model)
        graph = new.graph
        renamed_nodes = {i for i, _ in self.renames}
        nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(model.graph.node):
            nodes.extend(self.emit.get(i, []))
            if i in self.remove:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            if i in renamed_nodes:
                for (node_i, slot), name in self.renames.items():
                    if node_i == i:
                        copy.input[slot] = name
            if i in self.unscaled:
                for attr in copy.attribute:
                    if attr.name in ("alpha", "beta"):
                        attr.f = 1.0
            nodes.append(copy)
        nodes, unused = _drop_released(nodes, self.released, {o.name for o in model.graph.output})
        graph.node.extend(nodes)
        gone = self.drop_inits | unused
        # add().CopyFrom, not extend: upb's extend copies each message by serialising it, which fails
        # for a tensor of 2 GiB or more
        for t in model.graph.initializer:
            if t.name not in gone:
                graph.initializer.add().CopyFrom(t)
        for t in self.new_inits:
            graph.initializer.add().CopyFrom(t)
        graph.value_info.extend(v for v in model.graph.value_info if v.name not in self.stale)
        if self.drop_opsets:
            kept = [o for o in new.opset_import if o.domain not in self.drop_opsets]
            del new.opset_import[:]
            new.opset_import.extend(kept)
        have = {o.domain for o in new.opset_import}
        for domain, version in self.opsets.items():
            if domain not in have:
                new.opset_import.add(domain=domain, version=version)
        return new


# The ``source`` of constants that go to a runtime, never back to a file that is trained (what the runtime
# preparation makes): equal ones are stored once whatever layer made them, so the layers of blocks that
# share their weights (ALBERT's) do not get a copy each in the runtime's memory.
RUNTIME_ONLY = "runtime only"


def constant_base(editor: GraphEditor, lin: Linear) -> str:
    """The base name of the constants a lowering makes for ``lin``: its weight tensor (behind Identity
    copies), so layers that read one weight make, and then share, one set (:meth:`GraphEditor.const`)."""
    return editor.index.alias_root(lin.weight)


def content_key(value: np.ndarray) -> bytes:
    """A digest of an array's dtype, shape and values in C order, read a slab of rows at a time (a
    transposed weight is not copied whole)."""
    digest = hashlib.blake2b(f"{value.dtype.str}{value.shape}".encode(), digest_size=20)
    if value.ndim < 2:
        digest.update(value.tobytes())
        return digest.digest()
    rows = max(1, (1 << 22) // max(1, value[0].nbytes))  # about 4 MiB a slab
    for start in range(0, value.shape[0], rows):
        digest.update(value[start:start + rows].tobytes())  # tobytes: any dtype (bfloat16 has no buffer format)
    return digest.digest()


def _used_names(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    used: set[str] = set()
    for node in nodes:
        used.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                used |= names_used_in(sub)
    return used


def _drop_released(nodes: list[onnx.NodeProto], released: set[str], outputs: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """``nodes`` without the Constant and Identity nodes that only produced released, now unused
    tensors (an Identity's input is released in turn), and the released names nothing reads."""
    pending = set(released)
    unused: set[str] = set()
    while pending:
        used = _used_names(nodes) | outputs
        dead = {name for name in pending if name not in used}
        unused |= dead
        pending = set()
        kept = []
        for node in nodes:
            if node.op_type in ("Constant", "Identity") and node.domain in ("", "ai.onnx") and len(node.output) == 1 \
                    and node.output[0] in dead:
                pending.update(i for i in node.input if i)
                continue
            kept.append(node)
        nodes = kept
    return nodes, unused


def replace_weights(
    model: onnx.ModelProto,
    updates: Iterable[NewWeights],
    stale_tensors: Iterable[str] = (),
    record: FPERecord | None = None,
) -> onnx.ModelProto:
    """A new model in which each updated linear reads new initializers (the old ones are dropped).

    ``updates`` may be a generator that hands over one layer at a time: each array is converted and
    can be freed before the next is made. ``stale_tensors`` lose their value_info (their width
    changed); shape inference recomputes them. ``record`` replaces the model's FPE record.
    """
    editor = GraphEditor.start(model)
    for up in updates:
        editor.set_weights(up.linear, up.w, up.b)
    editor.stale |= set(stale_tensors)
    new = editor.apply(model)
    if record is not None:
        write_record(new, record)
    return new
