"""Torch versions of the ONNX shape, indexing, logic, reduction and normalisation operators.

The operators a transformer export writes around its linear layers (BERT, as ``torch.onnx.export``
writes it: shape arithmetic for the attention mask, embeddings by ``Gather``, ``LayerNormalization``,
reductions for pooling). Same protocol as :mod:`neurorewrite.models.onnx_ops`: each entry takes the
node's inputs (``None`` for an omitted optional one) and attributes and returns its output, or a tuple
of outputs for a node with several (``Split``).

Operators whose signature moved from attributes to inputs between opsets (``axes`` of ``Unsqueeze``,
``Squeeze``, ``Reduce*``; ``split``; ``Slice``'s ``starts``/``ends``) read the input when it is there and
the attribute otherwise, which covers every opset the project reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper

Tensor = torch.Tensor
INT_MAX = 2**62  # Slice bounds past the end (ONNX writes INT64_MAX)


def _ints(value: Tensor | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _axes(xs: Sequence[Tensor | None], attrs: dict[str, Any], position: int = 1) -> list[int] | None:
    """``axes`` from the input at ``position`` (newer opsets) or the attribute (older ones)."""
    if len(xs) > position and xs[position] is not None:
        return _ints(xs[position])
    return _ints(attrs.get("axes"))


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def tensor_of(array: np.ndarray) -> Tensor:
    """A torch copy of ``array``. bfloat16 (numpy's ml_dtypes type, which torch cannot take) becomes
    float32: a lifted bfloat16 graph computes in float32, its Casts to bfloat16 included (:func:`_dtype`)."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(np.array(array))


def _dtype(onnx_type: int) -> torch.dtype:
    from onnx import TensorProto, helper

    if onnx_type == TensorProto.BFLOAT16:
        return torch.float32  # see tensor_of
    return torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _shape(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    dims = list(xs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[slice(start, end)], dtype=torch.int64)


def _gather(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    data, indices = xs[0], xs[1].long()
    axis = _norm(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = torch.index_select(data, axis, indices.reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _gather_elements(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    data, indices = xs[0], xs[1].long()
    axis = _norm(attrs.get("axis", 0), data.dim())
    return torch.gather(data, axis, torch.where(indices < 0, indices + data.shape[axis], indices))


def _gather_nd(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    """``data`` at the index tuples in the last axis of ``indices``; the first ``batch_dims`` axes of
    both are shared (each batch entry indexes its own slice of ``data``)."""
    data, indices = xs[0], xs[1].long()
    batch_dims = int(attrs.get("batch_dims", 0))
    depth = indices.shape[-1]
    batch = int(np.prod(data.shape[:batch_dims], dtype=np.int64))
    indexed = data.shape[batch_dims:batch_dims + depth]
    tuples = indices.reshape(batch, -1, depth)
    tuples = torch.where(tuples < 0, tuples + torch.tensor(indexed, dtype=torch.int64), tuples)
    rows = torch.arange(batch).view(batch, 1).expand(batch, tuples.shape[1])
    picked = data.reshape(batch, *data.shape[batch_dims:])[(rows, *tuples.unbind(-1))]
    return picked.reshape(*indices.shape[:-1], *data.shape[batch_dims + depth:])


def _unsqueeze(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    axes = _axes(xs, attrs) or []
    rank = xs[0].dim() + len(axes)
    out = xs[0]
    for axis in sorted(_norm(a, rank) for a in axes):
        out = out.unsqueeze(axis)
    return out


def _squeeze(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    axes = _axes(xs, attrs)
    if axes is None:
        return xs[0].squeeze()
    rank = xs[0].dim()
    keep = [d for i, d in enumerate(xs[0].shape) if i not in {_norm(a, rank) for a in axes}]
    return xs[0].reshape(keep)


def _concat(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    parts = [x for x in xs if x is not None]
    return torch.cat(parts, dim=attrs["axis"])


def _slice(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    data = xs[0]
    starts = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else _ints(attrs.get("starts"))
    ends = _ints(xs[2]) if len(xs) > 2 and xs[2] is not None else _ints(attrs.get("ends"))
    axes = _axes(xs, attrs, 3) or list(range(len(starts or [])))
    steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(axes)
    index: list[slice] = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts or [], ends or [], axes, steps):
        axis = _norm(axis, data.dim())
        size = data.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            index[axis] = slice(start, end, step)
        else:  # torch slices only forwards: take the range, then flip it
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            picked = list(range(start, end, step))
            index[axis] = slice(0, 0) if not picked else slice(picked[-1], picked[0] + 1, -step)
            flips.append(axis)
    out = data[tuple(index)]
    return out.flip(flips) if flips else out


def _split(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> tuple[Tensor, ...]:
    axis = attrs.get("axis", 0)
    sizes = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else _ints(attrs.get("split"))
    if sizes is None:
        parts = attrs.get("num_outputs") or attrs["_outputs"]
        size = xs[0].shape[axis]
        chunk = -(-size // parts)
        sizes = [min(chunk, size - i * chunk) for i in range(parts)]
    return tuple(torch.split(xs[0], sizes, dim=axis))


def _expand(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    shape = torch.broadcast_shapes(tuple(xs[0].shape), tuple(_ints(xs[1]) or []))
    return xs[0].expand(shape)


def _tile(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    return xs[0].repeat(*(_ints(xs[1]) or []))


def _range(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    start, limit, delta = (x.item() for x in xs[:3])
    return torch.arange(start, limit, delta, dtype=xs[0].dtype)


def _constant_of_shape(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    value = attrs.get("value")
    fill = tensor_of(numpy_helper.to_array(value)) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(xs[0]) or []).clone()


def _where(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    return torch.where(xs[0].bool(), xs[1], xs[2])


def _reduce(fn: str) -> Any:
    def reduce(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
        x = xs[0]
        axes = _axes(xs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(_norm(a, x.dim()) for a in axes)
        if fn == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if fn == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if fn == "l2":
            return x.pow(2).sum(dim=dims, keepdim=keep).sqrt()
        if fn == "sumsquare":
            return x.pow(2).sum(dim=dims, keepdim=keep)
        out = x
        for d in sorted(dims, reverse=True):
            out = (out.amax if fn == "max" else out.amin)(dim=d, keepdim=keep)
        return out

    return reduce


def _layer_norm(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    x = xs[0]
    axis = _norm(attrs.get("axis", -1), x.dim())
    shape = tuple(x.shape[axis:])
    return F.layer_norm(x, shape, xs[1], xs[2] if len(xs) > 2 else None, attrs.get("epsilon", 1e-5))


def _div(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    a, b = xs[0], xs[1]
    if not a.dtype.is_floating_point and not b.dtype.is_floating_point:
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


def _compare(fn: Any) -> Any:
    return lambda xs, attrs: fn(xs[0], xs[1])


def _arg(fn: Any) -> Any:
    def arg(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
        x, axis, keep = xs[0], attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)

    return arg


def _mod(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    if attrs.get("fmod", 0):
        return torch.fmod(xs[0], xs[1])
    return torch.remainder(xs[0], xs[1])  # the sign of the divisor, as ONNX Mod with fmod=0


def _trilu(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    k = int(xs[1].item()) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(xs[0], k) if attrs.get("upper", 1) else torch.tril(xs[0], k)


def _cumsum(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    axis = int(xs[1].item())
    x = xs[0].flip(axis) if attrs.get("reverse", 0) else xs[0]
    out = torch.cumsum(x, axis)
    if attrs.get("exclusive", 0):
        out = out - x
    return out.flip(axis) if attrs.get("reverse", 0) else out


def _pad_indices(size: int, before: int, after: int, mode: str) -> Tensor:
    """Source positions along one axis for ``edge``, ``reflect`` and ``wrap`` padding by ``before`` and
    ``after`` (both >= 0)."""
    positions = torch.arange(-before, size + after)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    period = 2 * (size - 1)  # reflect: mirror about the first and last element, which are not repeated
    if period == 0:
        return torch.zeros_like(positions)
    folded = positions.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def _pad(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    """ONNX ``Pad``: ``pads`` (input from opset 11, attribute before) lists every padded axis's begin
    counts, then its end counts. ``axes`` (opset 18) names the axes it covers. Negative counts crop
    first, and the padding then reads the cropped tensor, as onnxruntime and the ONNX reference do."""
    x = xs[0]
    pads = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else _ints(attrs.get("pads")) or []
    axes = [_norm(a, x.dim()) for a in (_ints(xs[3]) if len(xs) > 3 and xs[3] is not None else range(x.dim()))]
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(xs) > 2 and xs[2] is not None and xs[2].numel():
        value = xs[2].reshape(()).item()
    else:
        value = attrs.get("value", 0.0)
    out = x
    for k, axis in enumerate(axes):
        before, after = pads[k], pads[k + len(axes)]
        cut_before, cut_after = max(-before, 0), max(-after, 0)
        out = out.narrow(axis, cut_before, out.shape[axis] - cut_before - cut_after)
        before, after = max(before, 0), max(after, 0)
        if before == after == 0:
            continue
        if mode == "constant":
            parts = []
            for count in (before, after):
                shape = list(out.shape)
                shape[axis] = count
                parts.append(torch.full(shape, value, dtype=out.dtype))
            out = torch.cat([parts[0], out, parts[1]], dim=axis)
        else:
            out = out.index_select(axis, _pad_indices(out.shape[axis], before, after, mode))
    return out


def _einsum(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    equation = attrs["equation"]
    return torch.einsum(equation.decode() if isinstance(equation, bytes) else equation, *xs)


TENSOR_OPS: dict[str, Any] = {
    "Shape": _shape,
    "Size": lambda xs, a: torch.tensor(xs[0].numel(), dtype=torch.int64),
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "Where": _where,
    "Cast": lambda xs, a: xs[0].to(_dtype(a["to"])),
    "CastLike": lambda xs, a: xs[0].to(xs[1].dtype),
    "Equal": _compare(torch.eq), "Greater": _compare(torch.gt), "Less": _compare(torch.lt),
    "GreaterOrEqual": _compare(torch.ge), "LessOrEqual": _compare(torch.le),
    "And": _compare(torch.logical_and), "Or": _compare(torch.logical_or), "Xor": _compare(torch.logical_xor),
    "Not": lambda xs, a: torch.logical_not(xs[0]),
    "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceL2": _reduce("l2"),
    "ReduceSumSquare": _reduce("sumsquare"), "ReduceMax": _reduce("max"), "ReduceMin": _reduce("min"),
    "LayerNormalization": _layer_norm,
    "Div": _div,
    "Einsum": _einsum,
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
    "Mod": _mod, "Trilu": _trilu, "CumSum": _cumsum, "Pad": _pad,
    "Floor": lambda xs, a: torch.floor(xs[0]), "Ceil": lambda xs, a: torch.ceil(xs[0]),
    "Round": lambda xs, a: torch.round(xs[0]), "Sign": lambda xs, a: torch.sign(xs[0]),
    "IsNaN": lambda xs, a: torch.isnan(xs[0]), "IsInf": lambda xs, a: torch.isinf(xs[0]),
    "Sin": lambda xs, a: torch.sin(xs[0]), "Cos": lambda xs, a: torch.cos(xs[0]),
}
