"""Torch versions of the ONNX operators an exported MLP uses, for :mod:`neurorewrite.models.onnx_module`.

Each entry takes the node's input tensors (``None`` for an omitted optional input) and its attributes,
and returns its first output. The set covers what torch and skl2onnx write for MLP classifiers and
regressors: linear layers, the elementwise activations ``rewriter.blocks`` accepts, and the few shape
and output ops (Flatten, Reshape, Softmax, ...) around them; :mod:`.onnx_ops_tensor` adds what a
transformer export writes (shape arithmetic, Gather, LayerNormalization, reductions). Softmax follows
opset >= 13 (one axis). An op returns a tensor, or a tuple for a node with several outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from neurorewrite.models.onnx_ops_tensor import TENSOR_OPS

Tensor = torch.Tensor
Op = Callable[[Sequence[Tensor | None], dict[str, Any]], Tensor]


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    return lambda xs, attrs: fn(xs[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    return lambda xs, attrs: fn(xs[0], xs[1])


def _gemm(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    a = xs[0].T if attrs.get("transA", 0) else xs[0]
    b = xs[1].T if attrs.get("transB", 0) else xs[1]
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if len(xs) < 3 or xs[2] is None else out + attrs.get("beta", 1.0) * xs[2]


def _clip(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else attrs.get("min")
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else attrs.get("max")
    return torch.clamp(xs[0], min=lo, max=hi)


def _flatten(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    axis = attrs.get("axis", 1)
    axis = axis + xs[0].dim() if axis < 0 else axis
    lead = 1
    for d in xs[0].shape[:axis]:
        lead *= d
    return xs[0].reshape(lead, -1)


def _reshape(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    shape = [int(s) for s in xs[1].tolist()]
    if not attrs.get("allowzero", 0):
        shape = [xs[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return xs[0].reshape(shape)


def _gelu(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(xs[0], approximate="tanh" if approx == "tanh" else "none")


def _hard_sigmoid(xs: Sequence[Tensor | None], attrs: dict[str, Any]) -> Tensor:
    return torch.clamp(attrs.get("alpha", 0.2) * xs[0] + attrs.get("beta", 0.5), 0.0, 1.0)


OPS: dict[str, Op] = {
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Pow": _binary(torch.pow), "Max": _binary(torch.maximum), "Min": _binary(torch.minimum),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Abs": _unary(torch.abs), "Neg": _unary(torch.neg), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Identity": _unary(lambda x: x), "Dropout": _unary(lambda x: x), "Softsign": _unary(F.softsign),
    "Softplus": _unary(F.softplus), "Selu": _unary(F.selu), "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu,
    "HardSigmoid": _hard_sigmoid,
    "Elu": lambda xs, a: F.elu(xs[0], a.get("alpha", 1.0)),
    "Celu": lambda xs, a: F.celu(xs[0], a.get("alpha", 1.0)),
    "LeakyRelu": lambda xs, a: F.leaky_relu(xs[0], a.get("alpha", 0.01)),
    "Clip": _clip,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Softmax": lambda xs, a: torch.softmax(xs[0], a.get("axis", -1)),
    "LogSoftmax": lambda xs, a: torch.log_softmax(xs[0], a.get("axis", -1)),
    "Transpose": lambda xs, a: xs[0].permute(*a["perm"]) if "perm" in a else xs[0].permute(*reversed(range(xs[0].dim()))),
}
OPS.update(TENSOR_OPS)  # shape, indexing, logic, reductions, LayerNormalization (transformer exports)
