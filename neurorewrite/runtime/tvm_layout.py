"""Keeping activations feature-major between sparse layers, so an FPE block is not transposed twice.

The sparse kernels read ``XT (in, n)`` and write ``YT (out, n)``. Converted op by op, an FPE block
would transpose ``YT`` back after the first layer, apply the activation, sum the children, and
transpose again before the second layer: two passes over the widest tensor of the model. Instead the
importer keeps a *twin* of every tensor it can hold feature-major: the output of a sparse layer, and
what element-wise ops, reshapes of the feature axes, sums over feature axes and gathers of feature
columns make of a twin. A sparse layer whose input has a twin reads it directly. Every tensor still
has its row-major value (a transpose of its twin, emitted lazily); where nothing reads it, dead-code
elimination removes it.

Twins track ``features`` (the trailing, static dims) and ``batch`` (the leading dims, flattened to
``n``): a tensor of shape ``(*batch, *features)`` has the twin ``(*features, n)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
import tvm.sym
from tvm import relax

from neurorewrite.kernels.transpose import emit_transpose

UNARY = frozenset({"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Softplus", "LeakyRelu", "Elu",
                   "Selu", "HardSigmoid", "HardSwish", "Identity", "Sqrt", "Mish", "Softsign", "Celu", "ThresholdedRelu"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})

Convert = Callable[[str, list], relax.Expr]


@dataclass(frozen=True)
class Twin:
    """``expr`` (emitted) of shape ``(*features, n)`` holds the tensor of shape ``(*batch, *features)``."""

    expr: relax.Expr
    features: tuple[int, ...]
    batch: tuple  # leading dims (ints or PrimExprs)

    @property
    def n(self) -> int | tvm.tirx.Expr:
        return self.expr.ty.shape[-1]


class FeatureMajor:
    """The twins of one import, keyed by the (Python identity of the) Relax expression they stand for."""

    def __init__(self, bb: relax.BlockBuilder, cpu: bool) -> None:
        self.bb = bb
        self.cpu = cpu
        self._twins: dict[int, tuple[relax.Expr, Twin]] = {}

    def get(self, expr: object) -> Twin | None:
        found = self._twins.get(id(expr))
        return found[1] if found is not None and found[0] is expr else None

    def logical(self, twin: Twin) -> relax.Expr:
        """The row-major tensor of ``twin`` (unemitted; dead code when nothing reads it), remembered."""
        n = twin.n
        size = int(np.prod(twin.features))
        flat = twin.expr if len(twin.features) == 1 else self.bb.emit(relax.op.reshape(twin.expr, (size, n)))
        rows = emit_transpose(self.bb, flat, size, _int(n), self.cpu)
        out = relax.op.reshape(rows, (*twin.batch, *twin.features))
        out = self.bb.normalize(out)
        self._twins[id(out)] = (out, twin)
        return out

    def sparse_output(self, yt: relax.Expr, out_features: int, batch: tuple) -> relax.Expr:
        return self.logical(Twin(yt, (out_features,), tuple(batch)))

    def propagate(self, op: str, inputs: list, attrs: dict, out: relax.Expr, convert: Convert) -> relax.Expr:
        """``out`` (the frontend's conversion of ``op``), or the row-major view of a twin when ``op``
        maps twins to a twin."""
        twin = self._rule(op, inputs, attrs, out, convert)
        return out if twin is None else self.logical(twin)

    def _rule(self, op: str, inputs: list, attrs: dict, out: relax.Expr, convert: Convert) -> Twin | None:
        twins = [self.get(x) for x in inputs]
        if not any(twins) or not isinstance(getattr(out, "ty", None), relax.TensorType):
            return None
        first = twins[0]
        if op in UNARY and first is not None and all(x is None for x in inputs[1:]):
            return self._emit(convert(op, [first.expr]), first.features, first.batch)
        if op in BINARY and len(inputs) == 2:
            return self._binary(op, inputs, twins, convert)
        if first is None:
            return None
        if op == "Reshape":
            return self._reshape(first, out)
        if op == "ReduceSum":
            return self._reduce_sum(first, inputs, attrs)
        if op == "Gather":
            return self._gather(first, inputs, attrs)
        return None

    def _emit(self, expr: relax.Expr, features: tuple[int, ...], batch: tuple) -> Twin:
        return Twin(self.bb.emit(expr), tuple(features), batch)

    def _binary(self, op: str, inputs: list, twins: list, convert: Convert) -> Twin | None:
        a, b = twins
        if a is not None and b is not None:
            if a.features == b.features and _same(a.batch, b.batch):
                return self._emit(convert(op, [a.expr, b.expr]), a.features, a.batch)
            return None
        twin = a or b
        other = inputs[1] if a is not None else inputs[0]
        if not isinstance(other, tvm.ir.expr.Constant):
            return None
        value = other.value.numpy()
        rank = len(twin.batch) + len(twin.features)
        if value.size == 1:
            const = relax.const(value.reshape(()))
        elif (value.ndim <= rank and value.shape[-len(twin.features):] == twin.features
              and all(d == 1 for d in value.shape[:-len(twin.features)])):
            const = relax.const(np.ascontiguousarray(value.reshape(*twin.features, 1)))  # per feature
        else:
            return None
        args = [twin.expr, const] if a is not None else [const, twin.expr]
        return self._emit(convert(op, args), twin.features, twin.batch)

    def _reshape(self, twin: Twin, out: relax.Expr) -> Twin | None:
        shape = [_int(d) for d in out.ty.shape]
        lead = len(twin.batch)
        if len(shape) <= lead or not _same(tuple(shape[:lead]), twin.batch):
            return None
        features = shape[lead:]
        if not all(isinstance(d, int) for d in features) or int(np.prod(features)) != int(np.prod(twin.features)):
            return None
        return self._emit(relax.op.reshape(twin.expr, (*features, twin.n)), tuple(features), twin.batch)

    def _reduce_sum(self, twin: Twin, inputs: list, attrs: dict) -> Twin | None:
        axes = attrs.get("axes")
        if axes is None and len(inputs) > 1 and isinstance(inputs[1], tvm.ir.expr.Constant):
            axes = inputs[1].value.numpy().reshape(-1).tolist()
        if not axes:
            return None
        rank, lead = len(twin.batch) + len(twin.features), len(twin.batch)
        axes = sorted({int(a) % rank for a in axes})
        if axes[0] < lead:
            return None  # a sum over the batch: not a feature-major op
        keep = bool(attrs.get("keepdims", 1))
        local = [a - lead for a in axes]
        features = tuple(1 if i in local else d for i, d in enumerate(twin.features) if keep or i not in local)
        return self._emit(relax.op.sum(twin.expr, axis=local, keepdims=keep), features, twin.batch)

    def _gather(self, twin: Twin, inputs: list, attrs: dict) -> Twin | None:
        indices = inputs[1]
        rank, lead = len(twin.batch) + len(twin.features), len(twin.batch)
        axis = int(attrs.get("axis", 0)) % rank
        if axis < lead or not isinstance(indices, tvm.ir.expr.Constant) or indices.value.numpy().ndim != 1:
            return None
        picked = indices.value.numpy().astype(np.int64) % twin.features[axis - lead]
        features = list(twin.features)
        features[axis - lead] = int(picked.size)
        return self._emit(relax.op.take(twin.expr, relax.const(picked), axis=axis - lead), tuple(features), twin.batch)


def _int(d: object) -> object:
    return int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else d


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    analyzer = tvm.sym.Analyzer()
    for x, y in zip(a, b):
        x, y = _int(x), _int(y)
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif not analyzer.can_prove_equal(x, y):
            return False
    return True
