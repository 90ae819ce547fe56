"""Build a new model from an old one with some linear layers' weights replaced.

The input model is never modified: the new one is assembled field by field, skipping the
initializers that are replaced so the old weights are not copied only to be thrown away.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear

METADATA_KEY = "neurorewrite.fpe"


@dataclass(frozen=True)
class NewWeights:
    """Effective weights for one linear layer: ``w`` (out, in), ``b`` (out,) or None to keep the bias."""

    linear: Linear
    w: np.ndarray
    b: np.ndarray | None


def _stored_dtype(index: GraphIndex, name: str) -> np.dtype:
    if name in index.initializers:
        return onnx.helper.tensor_dtype_to_np_dtype(index.initializers[name].data_type)
    value = index.constant_value(name)
    if value is None:
        raise ValueError(f"{name} is not a constant")
    return value.dtype


def _bias_shape(index: GraphIndex, name: str, out: int) -> tuple[int, ...]:
    shape = index.constant_shape(name) or (out,)
    return (out,) if all(d == 1 for d in shape) else tuple(shape[:-1]) + (out,)


def _copy_fields(src: Message, dst: Message, skip: tuple[str, ...]) -> None:
    for desc, value in src.ListFields():
        if desc.name in skip:
            continue
        if desc.is_repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.message_type is not None:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken``; added to ``taken``."""
    candidate, n = base, 0
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


def model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no nodes, initializers or value_info yet.

    The caller adds the ones it keeps, so weights about to be replaced are never copied.
    """
    new = onnx.ModelProto()
    _copy_fields(model, new, skip=("graph",))
    _copy_fields(model.graph, new.graph, skip=("initializer", "value_info", "node"))
    return new


def replace_weights(
    model: onnx.ModelProto,
    updates: Iterable[NewWeights],
    stale_tensors: Iterable[str],
    metadata: dict[str, object] | None = None,
) -> onnx.ModelProto:
    """A new model in which each updated linear reads new initializers (old ones are dropped).

    Gemm alpha/beta are reset to 1 because the new weights are effective weights. ``stale_tensors``
    lose their value_info (their width changed); shape inference recomputes them.
    """
    index = GraphIndex.build(model.graph)
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    taken |= {i.name for i in model.graph.input}
    drop: set[str] = set()
    dead_constants: set[int] = set()
    renames: dict[tuple[int, int], str] = {}  # (node index, input slot) -> new tensor name
    new_inits: list[onnx.TensorProto] = []
    scaled: set[int] = set()
    for up in updates:  # may be a generator that hands over (and releases) one layer at a time
        lin = up.linear
        if lin.op == "Gemm":
            scaled.add(lin.node)
        parts = [("weight", lin.weight, lin.node, 1)]
        if up.b is not None and lin.bias is not None:
            parts.append(("bias", lin.bias, lin.node if lin.add_node is None else lin.add_node, None))
        for what, old, node_i, slot in parts:
            node = model.graph.node[node_i]
            slot = slot if slot is not None else (2 if node.op_type == "Gemm" else list(node.input).index(old))
            dtype = _stored_dtype(index, old)
            if what == "weight":
                value = up.w if lin.weight_out_in else up.w.T
            else:
                value = up.b.reshape(_bias_shape(index, old, up.b.size))
            name = unique_name(old + ".fpe", taken)
            # from_array writes C-order bytes itself: no contiguous copy first
            new_inits.append(numpy_helper.from_array(value.astype(dtype, copy=False), name))
            renames[(node_i, slot)] = name
            if index.constant_source(old) == "initializer":
                drop.add(old)
            elif index.constant_source(old) == "constant":
                dead_constants.add(index.constant_nodes[old])
    new = model_shell(model)
    graph = new.graph
    graph.initializer.extend(t for t in model.graph.initializer if t.name not in drop)
    for i, node in enumerate(model.graph.node):
        if i in dead_constants:
            continue
        copy = graph.node.add()
        copy.CopyFrom(node)
        for (node_i, slot), name in renames.items():
            if node_i == i:
                copy.input[slot] = name
        if i in scaled:
            for attr in copy.attribute:
                if attr.name in ("alpha", "beta"):
                    attr.f = 1.0
    graph.initializer.extend(new_inits)
    stale = set(stale_tensors)
    graph.value_info.extend(v for v in model.graph.value_info if v.name not in stale)
    if metadata is not None:
        write_metadata(new, metadata)
    return new


def read_metadata(model: onnx.ModelProto, key: str = METADATA_KEY) -> dict[str, object] | None:
    """The JSON record under ``key`` in ``metadata_props`` (by default the FPE record), if any."""
    for prop in model.metadata_props:
        if prop.key == key:
            return json.loads(prop.value)
    return None


def write_metadata(model: onnx.ModelProto, record: Mapping[str, object], key: str = METADATA_KEY) -> None:
    """Store ``record`` as JSON under ``key`` in ``metadata_props``, replacing an earlier one in place.

    Edits ``model`` itself: call it on the new model a pass built, never on the pass's input.
    """
    value = json.dumps(record, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
