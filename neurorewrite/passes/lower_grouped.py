"""The ``grouped`` representation: W1' of a shared-partition block as one batched MatMul.

With ``--split blocks`` (or ``shared``, ``feature``) every hidden neuron uses the same partition of the inputs,
so child ``k`` of every parent reads the same columns ``S_k``: W1' is ``alpha`` dense ``(H, |S_k|)``
blocks. The first linear becomes ``Gather(S_0..S_alpha-1) -> Reshape -> Transpose -> MatMul(alpha
blocks) -> Add -> Transpose -> Reshape``, plain ONNX ops with the original FLOPs and bytes.

Its output holds the hidden units children-major (position ``k * H + i`` is child ``k`` of parent
``i``; the FPE layout is ``i * alpha + k``). The activation between is elementwise, so only the
consumer changes: its weight columns are permuted, or, in a chain, its Gather indices are.

A second linear whose children share their outgoing column (the ``--structured`` variant, see
``lower_structured.py``) becomes ``Reshape -> ReduceSum over children -> MatMul(W2)``: W2 is stored
once and runs at the original size. Any other second linear becomes a MatMul with permuted columns.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from neurorewrite.errors import InvalidOptionError
from neurorewrite.passes.lower_graph import GraphRewrite, leading_shape
from neurorewrite.rewriter.linear import Linear


def children_major(h: int, alpha: int) -> np.ndarray:
    """``new_to_old`` of the grouped output: position ``k*H + i`` holds FPE hidden unit ``i*alpha + k``."""
    return (np.arange(h)[None, :] * alpha + np.arange(alpha)[:, None]).ravel()


def child_columns(w: np.ndarray, alpha: int, layer: str) -> list[np.ndarray]:
    """The input columns each child reads, the same for every parent; raises if W1' is not shared.

    Columns that every child lost to pruning go to the child with the fewest columns (their weights
    are zero, so any child computes the same).
    """
    h = w.shape[0] // alpha
    nz = (w.reshape(h, alpha, -1) != 0).any(axis=0)  # (alpha, D): child k reads column j somewhere
    readers = nz.sum(axis=0)
    if (readers > 1).any():
        j = int(np.argmax(readers > 1))
        raise InvalidOptionError(
            f"--format grouped: layer {layer} does not use one input partition for all neurons (input {j} "
            "goes to several children); expand with --split blocks, shared or feature, or use --format sparse"
        )
    owner = np.where(readers == 1, nz.argmax(axis=0), -1)
    load = np.bincount(owner[owner >= 0], minlength=alpha)
    for j in np.flatnonzero(owner < 0):
        owner[j] = int(np.argmin(load))
        load[owner[j]] += 1
    return [np.flatnonzero(owner == k) for k in range(alpha)]


def lower_grouped_first(
    rw: GraphRewrite, lin: Linear, w: np.ndarray, b: np.ndarray | None, alpha: int, new_to_old: np.ndarray | None,
) -> np.ndarray:
    """Replace the first linear of a block by the batched form; returns its output's ``new_to_old``."""
    h = w.shape[0] // alpha
    cols = child_columns(w, alpha, lin.name)
    m = max(c.size for c in cols)
    old_to_new = np.arange(w.shape[1]) if new_to_old is None else np.argsort(new_to_old)
    gather = np.zeros((alpha, m), dtype=np.int32 if w.shape[1] < 2**31 else np.int64)  # padding reads column 0 against a zero weight
    blocks = np.zeros((alpha, m, h), dtype=w.dtype)
    for k, c in enumerate(cols):
        gather[k, : c.size] = old_to_new[c]
        blocks[k, : c.size, :] = w[k::alpha, c].T
    base = lin.name + "/grouped"
    x = rw.node("Gather", [lin.data_input, rw.const(base + ".columns", gather.ravel())], base, axis=-1)[0]
    x = rw.node("Reshape", [x, rw.const(base + ".split", np.array([-1, alpha, m], np.int64))], base)[0]
    x = rw.node("Transpose", [x], base, perm=[1, 0, 2])[0]
    y = rw.node("MatMul", [x, rw.const(lin.weight + ".blocks", blocks)], base)[0]
    if b is not None:
        y = rw.node("Add", [y, rw.const(base + ".bias", b.reshape(h, alpha).T[:, None, :].copy())], base)[0]
    y = rw.node("Transpose", [y], base, perm=[1, 0, 2])[0]
    shape = leading_shape(rw, lin.data_input, base, [alpha * h])
    nodes = rw.take()
    nodes.append(helper.make_node("Reshape", [y, shape], [lin.output], name=rw.name(base + "/out")))
    rw.replace_linear(lin, nodes)
    return children_major(h, alpha)


def is_tied(w: np.ndarray, alpha: int) -> bool:
    """Whether the children of every parent share their outgoing column (W2' columns ``i*alpha+k``)."""
    w3 = w.reshape(w.shape[0], -1, alpha)
    return bool(np.array_equal(w3, np.broadcast_to(w3[:, :, :1], w3.shape)))


def lower_second(
    rw: GraphRewrite, lin: Linear, w: np.ndarray, b: np.ndarray | None, alpha: int, new_to_old: np.ndarray, opset: int,
) -> str:
    """Replace a block's last linear: ReduceSum over children + W2 when tied, else a MatMul with permuted columns."""
    base = lin.name + "/grouped"
    tied = is_tied(w, alpha) and np.array_equal(new_to_old, children_major(w.shape[1] // alpha, alpha))
    x = lin.data_input
    if tied:
        h = w.shape[1] // alpha
        shape = leading_shape(rw, x, base, [alpha, h])
        x = rw.node("Reshape", [x, shape], base)[0]
        if opset >= 13:
            x = rw.node("ReduceSum", [x, rw.const(base + ".children", np.array([-2], np.int64))], base, keepdims=0)[0]
        else:
            x = rw.node("ReduceSum", [x], base, axes=[-2], keepdims=0)[0]
        weight = w[:, ::alpha].T
    else:
        weight = w[:, new_to_old].T
    y = rw.node("MatMul", [x, rw.const(lin.weight + (".tied" if tied else ".permuted"), weight.copy())], base)[0]
    nodes = rw.take()
    if b is not None:
        nodes.append(helper.make_node("Add", [y, rw.const(base + ".bias", b)], [lin.output], name=rw.name(base + "/add")))
    else:
        nodes[-1].output[0] = lin.output
    rw.replace_linear(lin, nodes)
    return "tied" if tied else "permuted"
