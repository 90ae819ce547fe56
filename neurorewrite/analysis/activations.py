"""Hidden activations of MLP blocks on a data sample: dead and always-on neurons, monosemantic scale.

The activations are the tensor each block's second linear reads (the activation output), computed by
onnxruntime. Every position of a sample row is one activation vector: a (N, T, H) tensor gives N*T rows.

Definitions, per hidden neuron, over all activation vectors of the sample:

- dead: ``|z| <= ACTIVE_EPS`` for every vector (it never outputs anything).
- always-on: ``z > ACTIVE_EPS`` for every vector (for ReLU-like activations: it never switches off, so
  it acts as a linear unit). Both are meaningful for ReLU-like activations; the activation is reported.
- monosemantic scale (docs/methods.md 2): ``phi(z) = (z - mu)^2 / (s^2 + 0.01 * mean(s^2))`` with ``mu``,
  ``s^2`` the neuron's mean and unbiased variance over the sample and ``mean(s^2)`` over the layer's
  neurons. Each neuron is summarised by its **maximum** phi over the sample (``phi_max``): a neuron
  that fires strongly on a few inputs only (monosemantic) has a large one. The maximum is exact from
  per-neuron min, max, mean and variance, so the sample is streamed in chunks of rows and never held.
  A constant neuron (``s^2 = 0``) has phi 0; if every neuron is constant, all phi are 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from neurorewrite.errors import DataError
from neurorewrite.executor import OutputProbe, match_inputs
from neurorewrite.passes.prepare import prepare_for_runtime
from neurorewrite.runtime.ort import ort_session

ACTIVE_EPS = 1e-6
PHI_EPS = 0.01  # docs/methods.md 2: s^2 + 0.01 * mean(s^2)
FIRST_ROWS = 16  # sample rows of the first onnxruntime run, which measures what a row costs
RUN_BYTES = 1 << 30  # later runs take as many rows as keep the hidden tensors under this


@dataclass(frozen=True)
class ActivationStats:
    """Per-neuron statistics of one hidden layer over a sample (arrays of shape (H,))."""

    vectors: int  # activation vectors seen (sample rows x positions)
    mean: np.ndarray
    var: np.ndarray  # unbiased
    dead: np.ndarray  # bool
    always_on: np.ndarray  # bool
    phi_max: np.ndarray

    @property
    def dead_fraction(self) -> float:
        return float(self.dead.mean()) if self.dead.size else 0.0

    @property
    def always_on_fraction(self) -> float:
        return float(self.always_on.mean()) if self.always_on.size else 0.0


class _Accumulator:
    """Chan's parallel merge of count, mean and sum of squared deviations, plus min, max, counts."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)
        self.lo = np.full(width, np.inf)
        self.hi = np.full(width, -np.inf)
        self.active = np.zeros(width, dtype=np.int64)
        self.positive = np.zeros(width, dtype=np.int64)

    def add(self, z: np.ndarray) -> None:
        z = z.astype(np.float64, copy=False)
        n_b = z.shape[0]
        if n_b == 0:
            return
        mean_b = z.mean(axis=0)
        m2_b = ((z - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n
        self.lo = np.minimum(self.lo, z.min(axis=0))
        self.hi = np.maximum(self.hi, z.max(axis=0))
        self.active += (np.abs(z) > ACTIVE_EPS).sum(axis=0)
        self.positive += (z > ACTIVE_EPS).sum(axis=0)

    def result(self) -> ActivationStats:
        var = self.m2 / (self.n - 1) if self.n > 1 else np.zeros_like(self.m2)
        return ActivationStats(
            vectors=self.n, mean=self.mean, var=var, dead=self.active == 0, always_on=self.positive == self.n,
            phi_max=phi_max_from_range(self.lo, self.hi, self.mean, var),
        )


def _over_denominator(squared: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``squared / (s^2 + 0.01 * mean(s^2))``, 0 where that denominator is 0 (constant neurons)."""
    denom = var + PHI_EPS * float(np.mean(var)) if var.size else var
    safe = np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, squared / safe, 0.0)


def monosemantic_scale(z: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``phi`` of activations ``z`` (rows, H) given per-neuron mean and unbiased variance (H,)."""
    return _over_denominator((z - mean) ** 2, var)


def phi_max_from_range(lo: np.ndarray, hi: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Max over the sample of phi: (z - mu)^2 is largest at the sample's min or max of z."""
    return _over_denominator(np.maximum((hi - mean) ** 2, (lo - mean) ** 2), var)


@dataclass(frozen=True)
class Feeds:
    """Sample arrays matched to a model's inputs; ``chunkable`` when every input's first axis is free."""

    arrays: dict[str, np.ndarray]
    rows: int
    chunkable: bool


def check_data(model: onnx.ModelProto, sample: Mapping[str, np.ndarray], where: str) -> Feeds:
    """The sample as feeds for ``model``, or a DataError naming what does not match (nothing runs)."""
    session = ort_session(model, providers=["CPUExecutionProvider"], threads=1)
    feeds = match_inputs(session, sample, where)
    rows = {v.shape[0] if v.ndim else 0 for v in feeds.values()}
    if len(rows) != 1 or 0 in rows:
        sizes = ", ".join(f"{k}: {v.shape[0] if v.ndim else 'scalar'}" for k, v in feeds.items())
        raise DataError(f"{where}: the sample arrays need one common, nonzero first dimension (rows); got {sizes}")
    chunkable = all(i.shape and not isinstance(i.shape[0], int) for i in session.get_inputs())
    return Feeds(feeds, rows.pop(), chunkable)


def hidden_statistics(
    model: onnx.ModelProto,
    feeds: Feeds,
    hidden: Sequence[str],
    rows_per_run: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    feature_axes: Mapping[str, int] | None = None,
) -> dict[str, ActivationStats]:
    """Statistics of each named hidden tensor of ``model`` over the sample, streamed in row chunks.

    A tensor's neurons are along its last axis, or along ``feature_axes[name]`` (1 for a 1x1-Conv block).

    Without ``rows_per_run`` the first run takes ``FIRST_ROWS`` rows and later runs as many as keep the
    hidden tensors under ``RUN_BYTES`` (long sequences make a row expensive). An input with a fixed
    first dimension is run whole.
    """
    total = feeds.rows
    step = (rows_per_run or FIRST_ROWS) if feeds.chunkable else total
    acc: dict[str, _Accumulator] = {}
    probe = OutputProbe(prepare_for_runtime(model, "onnxruntime")[0], hidden)
    start = 0
    while start < total:
        chunk = {k: v[start:start + step] for k, v in feeds.arrays.items()}
        values = probe.run(chunk)
        rows = next(iter(chunk.values())).shape[0]
        for name in hidden:
            z = values[name]
            axis = (feature_axes or {}).get(name, -1)
            if axis != -1 and z.ndim > 1:
                z = np.moveaxis(z, axis, -1)
            z = z.reshape(-1, z.shape[-1]) if z.ndim else z.reshape(1, 1)
            acc.setdefault(name, _Accumulator(z.shape[1])).add(z)
        start += rows
        if rows_per_run is None and feeds.chunkable:
            per_row = sum(values[name].nbytes for name in hidden) / max(rows, 1)
            step = max(1, int(RUN_BYTES // max(per_row, 1)))
        if progress is not None:
            progress(start, total)
    return {name: acc[name].result() for name in hidden}
