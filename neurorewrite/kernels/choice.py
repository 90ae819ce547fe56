"""Which kernel runs a sparse linear layer: a registry of kernel families and the choice among them.

A family (one module each, registered with :func:`register_kernel`) looks at a
:class:`SparseLinearTask` (the fixed CSR weight, the model's FPE alpha, the target) and returns its
:class:`Candidate` kernels for it: one per tile shape or encoding worth trying, or none when it cannot
run the layer. Every candidate has the same interface: a PrimFunc ``(XT (in, n), *weights, YT (out, n))``
on feature-major activations with a symbolic batch ``n`` (so one function serves every batch size),
plus a static cost estimate.

The choice (:class:`Choice`) maps batch sizes to candidates. On the machine that will run the library
it is measured (:mod:`neurorewrite.kernels.measure`: each candidate timed alone, the result kept in the
tuning database); for another target it falls back to the estimates. Nothing here knows ONNX.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tvm

Built = tuple[tvm.tirx.PrimFunc, list[np.ndarray]]


@dataclass(frozen=True, eq=False)
class SparseLinearTask:
    """``YT (out, n) = W @ XT (in, n) + bias`` with ``W`` fixed, validated CSR arrays."""

    name: str
    in_features: int
    out_features: int
    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    bias: np.ndarray | None
    alpha: int  # the model's FPE alpha: rows in runs of alpha may be one parent's children
    target: tvm.target.Target

    @property
    def cpu(self) -> bool:
        return self.target.kind.name == "llvm"

    @property
    def nonzeros(self) -> int:
        return int(self.values.size)

    @property
    def density(self) -> float:
        return self.nonzeros / max(1, self.in_features * self.out_features)

    def dense_bias(self) -> np.ndarray:
        """The bias as float32 ``(out_features,)``, zeros when the layer has none."""
        if self.bias is None:
            return np.zeros(self.out_features, dtype=np.float32)
        return np.asarray(self.bias, dtype=np.float32).reshape(self.out_features)

    def signature(self) -> str:
        """What a kernel's speed depends on: shape, alpha, the sparsity pattern (not the values)."""
        digest = hashlib.sha256()
        digest.update(f"{self.in_features},{self.out_features},{self.alpha},{self.bias is not None}".encode())
        for array in (self.indptr, self.indices):
            digest.update(np.ascontiguousarray(np.asarray(array).astype(np.int64)).tobytes())
        return digest.hexdigest()[:32]


@dataclass(eq=False)
class Candidate:
    """One kernel with fixed tile parameters. ``build()`` packs the weights and returns the PrimFunc and
    its weight arguments (cached); ``estimate(n)`` is a static cost in ns at ``n`` rows, used to rank
    where nothing is measured. ``bias_inside`` False: the caller adds the bias after the kernel.
    ``tunable``: the PrimFunc is a TensorIR kernel MetaSchedule can tune (needs ``schedule`` to run untuned)."""

    kernel: str
    variant: str
    pack: Callable[[], Built]
    estimate: Callable[[int], float]
    bias_inside: bool = True
    schedule: Callable[[tvm.tirx.PrimFunc], tvm.tirx.PrimFunc] | None = None
    _built: Built | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.variant}".strip()

    def build(self) -> Built:
        if self._built is None:
            self._built = self.pack()
        return self._built


Family = Callable[[SparseLinearTask], list[Candidate]]
_FAMILIES: dict[str, Family] = {}


def register_kernel(name: str) -> Callable[[Family], Family]:
    """Register a kernel family: a function ``task -> candidates`` (an empty list where it cannot run)."""

    def register(family: Family) -> Family:
        _FAMILIES[name] = family
        return family

    return register


def kernel_names() -> list[str]:
    """The registered kernel families."""
    return list(_FAMILIES)


def candidates_for(task: SparseLinearTask) -> list[Candidate]:
    """Every registered family's candidates for ``task``."""
    found = [c for family in _FAMILIES.values() for c in family(task)]
    if not found:
        raise RuntimeError(f"no kernel can run SparseLinear {task.name}")  # the TensorIR ELL kernel runs everything
    return found


@dataclass
class Choice:
    """Which candidate runs at which batch size: ``ranges`` is ``[(first n, candidate name), ...]``,
    ascending from n = 1. ``source``: measured, recorded (read from the tuning database) or estimated."""

    ranges: list[tuple[int, str]]
    source: str
    timings_us: dict[str, dict[int, float]] = field(default_factory=dict)

    def kernel_for(self, n: int) -> str:
        chosen = self.ranges[0][1]
        for start, name in self.ranges:
            if n >= start:
                chosen = name
        return chosen

    @property
    def kernels(self) -> list[str]:
        return list(dict.fromkeys(name for _, name in self.ranges))

    def describe(self) -> str:
        if len(self.ranges) == 1:
            return self.ranges[0][1]
        parts = []
        for i, (start, name) in enumerate(self.ranges):
            end = self.ranges[i + 1][0] - 1 if i + 1 < len(self.ranges) else None
            parts.append(f"{name} (n {start}{'+' if end is None else f'-{end}'})")
        return "; ".join(parts)


MAX_KERNELS_PER_LAYER = 2  # each kernel of a layer stores its own packing of the weights in the library
KEEP_WITHIN = 1.1  # the kernel of the previous batch range stays while it is this close to the fastest


def choice_from_costs(costs: dict[str, dict[int, float]], source: str, max_kernels: int = MAX_KERNELS_PER_LAYER) -> Choice:
    """The fastest candidate per probed batch size, at most :data:`MAX_KERNELS_PER_LAYER` distinct ones;
    a probe's winner serves batches from that probe up to the next. A kernel within
    :data:`KEEP_WITHIN` of the fastest keeps its range going (timing noise does not split ranges)."""
    probes = sorted({n for per in costs.values() for n in per})
    names = [name for name in costs if all(n in costs[name] for n in probes)]

    def winners_among(pool: list[str]) -> list[str]:
        out: list[str] = []
        for n in probes:
            best = min(pool, key=lambda name: costs[name][n])
            keep = out[-1] if out and costs[out[-1]][n] <= KEEP_WITHIN * costs[best][n] else None
            out.append(keep or best)
        return out

    winners = winners_among(names)
    if len(set(winners)) > max_kernels:
        kept = sorted(set(winners), key=lambda name: (-winners.count(name), winners.index(name)))[:max_kernels]
        winners = winners_among(kept)
    ranges: list[tuple[int, str]] = []
    for n, name in zip(probes, winners):
        if not ranges or ranges[-1][1] != name:
            ranges.append((1 if not ranges else n, name))
    return Choice(ranges, source, {name: dict(costs[name]) for name in set(winners)})


def estimated_choice(candidates: list[Candidate], probes: list[int], max_kernels: int = MAX_KERNELS_PER_LAYER) -> Choice:
    """The choice from the static estimates (targets this process cannot time)."""
    return choice_from_costs({c.name: {n: c.estimate(n) for n in probes} for c in candidates}, "estimated", max_kernels)


def simd_lanes(target: tvm.target.Target) -> int:
    """Floats per SIMD vector on a CPU target: 16 with AVX-512, 8 with AVX2, else 4."""
    feature = tvm.get_global_func("target.llvm_cpu_has_feature", allow_missing=True)
    if target.kind.name != "llvm" or feature is None:
        return 4
    for name, lanes in (("avx512f", 16), ("avx2", 8)):
        if feature(name, target):
            return lanes
    return 4
