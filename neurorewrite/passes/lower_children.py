"""The ``grouped`` format of a lone tied block (``--structured``): one 2-D MatMul per child.

A block whose children read one input partition (``S_k`` for child ``k`` of every parent) and share
their parent's outgoing column computes ``y = W2 @ sum_k act(W1_k x[S_k] + b1_k) + b2``. Written as

    x -> Split (contiguous S_k, the ``blocks`` split) or Gather (any other partition)
      -> per child: MatMul(x_k, W1_k) + b1_k -> a copy of the activation
      -> Sum over children -> MatMul(W2) + b2

every weight is a 2-D constant, which onnxruntime pre-packs (a batched MatMul with a 3-D constant
weight is re-packed on every call; measured 1.4x the dense block at batch 32 against 1.1x for this
form, ``benchmarks/deploy.py``), MatMul+Add fuse into Gemm, and no Transpose is needed: the FLOPs and
weight bytes are the original block's, plus the activation on ``alpha`` times the hidden width.
The input's rank is kept (a transformer FFN stays ``(batch, sequence, features)``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from neurorewrite.passes.lower_graph import GraphRewrite
from neurorewrite.passes.lower_grouped import child_columns
from neurorewrite.rewriter.blocks import MLPBlock


def can_lower_children(rw: GraphRewrite, block: MLPBlock, w1: np.ndarray, alpha: int) -> bool:
    """Every child reads at least one input, and nothing outside the block reads its hidden tensors
    (the activation is copied per child, so the original hidden tensors disappear)."""
    if w1.shape[1] < alpha:
        return False
    inside = set(block.activation_nodes) | {block.second.node}
    return all(set(rw.index.consumers.get(t, ())) <= inside and t not in rw.index.graph_outputs
               for t in (block.first.output, *block.region_tensors))


def lower_children(
    rw: GraphRewrite, model: onnx.ModelProto, block: MLPBlock, w1: np.ndarray, b1: np.ndarray | None,
    w2: np.ndarray, b2: np.ndarray | None, alpha: int, opset: int,
) -> list[dict[str, object]]:
    """Replace ``block`` (tied: ``W2'`` columns ``i*alpha+k`` equal) as in the module docstring; report rows."""
    base = block.first.name + "/children"
    cols = child_columns(w1, alpha, block.first.name)
    parts, how = _child_inputs(rw, block.first.data_input, cols, base, opset)
    outputs = []
    for k, (x_k, c) in enumerate(zip(parts, cols)):
        (h,) = rw.node("MatMul", [x_k, rw.const(f"{block.first.weight}.child{k}", w1[k::alpha, c].T)], f"{base}{k}")
        if b1 is not None:
            (h,) = rw.node("Add", [h, rw.const(f"{base}{k}.bias", b1[k::alpha])], f"{base}{k}")
        outputs.append(_copy_activation(rw, model, block, h, k))
    (summed,) = rw.node("Sum", outputs, base)
    second = block.second
    (y,) = rw.node("MatMul", [summed, rw.const(second.weight + ".tied", w2[:, ::alpha].T)], second.name + "/tied")
    nodes = rw.take()
    if b2 is not None:
        nodes.append(helper.make_node("Add", [y, rw.const(second.name + ".bias", b2)], [second.output],
                                      name=rw.name(second.name + "/tied/add")))
    else:
        nodes[-1].output[0] = second.output
    # emitted where the second linear was: every input of the activation exists by then
    rw.replace_linear(block.first, [])
    rw.replace_linear(second, nodes)
    rw.remove |= set(block.activation_nodes)
    rw.stale |= {block.first.output, *block.region_tensors}
    return [
        {"layer": block.first.name, "kind": f"grouped x{alpha} ({how}, one MatMul per child)", "shape": list(w1.shape)},
        {"layer": second.name, "kind": "tied", "shape": list(w2.shape)},
    ]


def _child_inputs(rw: GraphRewrite, x: str, cols: list[np.ndarray], base: str, opset: int) -> tuple[list[str], str]:
    """``x[..., S_k]`` per child: one Split when the ``S_k`` are consecutive slices, else a Gather each."""
    starts = np.cumsum([0] + [c.size for c in cols[:-1]])
    if all(np.array_equal(c, np.arange(s, s + c.size)) for s, c in zip(starts, cols)):
        sizes = np.array([c.size for c in cols], dtype=np.int64)
        outs = [rw.name(f"{base}.split{k}") for k in range(len(cols))]
        inputs = [x, rw.const(base + ".sizes", sizes)] if opset >= 13 else [x]
        attrs = {} if opset >= 13 else {"split": sizes.tolist()}
        rw.pending.append(helper.make_node("Split", inputs, outs, name=rw.name(base + "/Split"), axis=-1, **attrs))
        return outs, "split"
    index_type = np.int32 if cols[0].size == 0 or max(int(c.max()) for c in cols if c.size) < 2**31 else np.int64
    gathers = [rw.node("Gather", [x, rw.const(f"{base}{k}.columns", c.astype(index_type))], f"{base}{k}", axis=-1)[0]
               for k, c in enumerate(cols)]
    return gathers, "gather"


def _copy_activation(rw: GraphRewrite, model: onnx.ModelProto, block: MLPBlock, pre: str, k: int) -> str:
    """The block's activation nodes again, reading ``pre``; returns the copy of the hidden tensor."""
    renamed = {block.first.output: pre}
    for i in sorted(block.activation_nodes):
        node = model.graph.node[i]
        for out in node.output:
            renamed[out] = rw.name(f"{out}.child{k}")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = rw.name(f"{node.name or node.op_type}.child{k}")
        copy.input[:] = [renamed.get(t, t) for t in node.input]
        copy.output[:] = [renamed[t] for t in node.output]
        rw.pending.append(copy)
    return renamed.get(block.hidden, pre)  # an identity activation: the hidden is the pre-activation
