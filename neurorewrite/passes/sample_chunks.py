"""A calibration sample as chunks of torch feeds: validated, split into fit and held-out samples,
padding positions marked (and trimmed) so they are never rows.

Axis 0 of every input array is the sample axis. With an ``attention_mask`` input (the Hugging Face
convention; ``mask_input`` names another), a position whose mask is 0 is padding: it is not a row of any
fit or score. Samples are sorted by length into chunks of about ``chunk_rows`` positions, and the
trailing columns that are padding in the whole chunk are cut off when the model's sequence axis is
dynamic (a padded position cannot change a real one through a masked model; cutting them saves the
work). Every ``1/holdout``-th sample (evenly spaced) is held out: it is never fit, only scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import helper

from neurorewrite.errors import DataError, InvalidOptionError, UnsupportedModelError
from neurorewrite.models.onnx_module import InputSpec

MASK_INPUT = "attention_mask"


@dataclass
class Chunk:
    feeds: dict[str, torch.Tensor]
    real: torch.Tensor | None  # bool (samples, positions): which positions are rows; None: all are
    holdout: bool
    samples: int

    def rows(self, tensor: torch.Tensor, features: int, axis: int = -1) -> torch.Tensor:
        """``tensor`` as ``(rows, features)``, padding positions left out; ``axis`` holds the features
        (1 for a Conv's NCHW tensors)."""
        if axis != -1 and tensor.dim() > 1:
            tensor = tensor.movedim(axis, -1)
        flat = tensor.reshape(-1, features)
        if self.real is None or flat.shape[0] != self.real.numel():
            return flat
        return flat[self.real.reshape(-1)]


@dataclass
class SampleChunks:
    chunks: list[Chunk] = field(default_factory=list)
    samples: int = 0
    holdout_samples: int = 0
    positions: int = 0  # before trimming
    real_positions: int = 0  # rows: positions the mask keeps
    computed_positions: int = 0  # after trimming
    mask_input: str | None = None
    trimmed: bool = False  # trailing padding was cut

    @property
    def fit(self) -> list[Chunk]:
        return [c for c in self.chunks if not c.holdout]

    @property
    def held_out(self) -> list[Chunk]:
        return [c for c in self.chunks if c.holdout]


def _np_dtype(spec: InputSpec, where: str) -> np.dtype:
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(spec.elem_type))
        if dtype.kind in "biufc":  # what torch can hold (strings are objects)
            return dtype
    except (KeyError, TypeError, ValueError):  # 0 (undefined) or a number onnx does not know: a damaged file
        pass
    raise UnsupportedModelError(f"{where}: model input {spec.name} declares element type {spec.elem_type}, "
                                "which no sample array can be converted to; is the model file damaged?")


def check_sample(inputs: list[InputSpec], sample: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The sample's arrays for the graph's inputs, converted to their types; a DataError names what
    does not fit (missing inputs, shapes, sample counts, non-finite rows)."""
    if len(inputs) == 1 and len(sample) == 1 and inputs[0].name not in sample:
        sample = {inputs[0].name: next(iter(sample.values()))}
    missing = [i.name for i in inputs if i.name not in sample]
    if missing:
        raise DataError(f"{where}: no array for model input(s) {', '.join(missing)} (has {', '.join(sample) or 'none'})")
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        value = np.asarray(sample[spec.name])
        if value.ndim != len(spec.shape) or any(d is not None and d != v for d, v in zip(spec.shape, value.shape)):
            shape = ["?" if d is None else d for d in spec.shape]
            raise DataError(f"{where}: input {spec.name} expects shape {shape}, the sample has {list(value.shape)}")
        if value.dtype.kind == "f":
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1) if value.ndim else ~np.isfinite(value)
            if np.any(bad):
                rows = np.flatnonzero(bad)
                raise DataError(f"{where}: input {spec.name} has NaN or infinite values in sample row(s) "
                                f"{', '.join(map(str, rows[:5]))}{' ...' if rows.size > 5 else ''}; remove those rows")
        arrays[spec.name] = value.astype(_np_dtype(spec, where), copy=False)
    counts = {name: (len(a) if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: the inputs hold different numbers of samples (axis 0): "
                        + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return arrays


def _lengths(mask: np.ndarray) -> np.ndarray:
    """Per sample, one past the last real position (0 for an all-padding sample)."""
    real = mask.reshape(len(mask), -1) != 0
    last = real.shape[1] - np.argmax(real[:, ::-1], axis=1)
    return np.where(real.any(axis=1), last, 0)


def holdout_indices(n: int, share: float) -> set[int]:
    """``round(n * share)`` sample indices, evenly spaced: the held-out samples."""
    if not 0.0 <= share < 1.0:
        raise InvalidOptionError(f"--holdout must be in [0, 1), got {share}")
    k = int(round(n * share))
    return set(np.linspace(0, n - 1, k).round().astype(int).tolist()) if k else set()


@dataclass
class SampleArrays:
    """A validated sample: the arrays by input name, the padding mask and whether padding can be cut."""

    inputs: list[InputSpec]
    arrays: dict[str, np.ndarray]
    mask: np.ndarray | None  # (samples, positions), nonzero = real
    mask_input: str | None
    can_trim: bool
    seq_inputs: set[str]

    @classmethod
    def build(cls, inputs: list[InputSpec], sample: Mapping[str, np.ndarray], where: str,
              mask_input: str | None = MASK_INPUT, trim: bool = True) -> SampleArrays:
        arrays = check_sample(inputs, sample, where)
        n = len(next(iter(arrays.values())))
        if n < 2:
            raise DataError(f"{where}: the sample needs at least 2 rows, it has {n}")
        mask = arrays.get(mask_input) if mask_input else None
        if mask is not None and mask.ndim != 2:
            mask = None
        # trailing padding can be cut when every input of shape (samples, seq, ...) has a dynamic seq axis
        seq = {s.name for s in inputs if mask is not None and arrays[s.name].ndim >= 2
               and arrays[s.name].shape[:2] == mask.shape}
        can_trim = trim and mask is not None and all(len(s.shape) > 1 and s.shape[1] is None for s in inputs if s.name in seq)
        return cls(inputs, arrays, mask, mask_input if mask is not None else None, can_trim, seq)

    @property
    def samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def lengths(self) -> np.ndarray:
        return _lengths(self.mask) if self.mask is not None else np.ones(self.samples, dtype=np.int64)

    def feeds(self, idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
        """Torch feeds of the samples ``idx`` (trailing padding cut where it can be), their real positions,
        and the number of positions kept."""
        width = max(1, int(self.lengths[idx].max())) if self.can_trim else (self.mask.shape[1] if self.mask is not None else 1)
        feeds = {}
        for spec in self.inputs:
            value = self.arrays[spec.name][idx]
            if self.can_trim and spec.name in self.seq_inputs:
                value = value[:, :width]
            feeds[spec.name] = torch.from_numpy(np.ascontiguousarray(value))
        real = None if self.mask is None else torch.from_numpy(np.ascontiguousarray(self.mask[idx][:, :width] != 0))
        return feeds, real, width


def chunk_sample(
    inputs: list[InputSpec], sample: Mapping[str, np.ndarray], where: str, holdout: float = 0.2,
    chunk_rows: int = 4096, mask_input: str | None = MASK_INPUT, trim: bool = True,
) -> SampleChunks:
    """Validate ``sample`` against ``inputs`` and cut it into chunks; see the module docstring."""
    data = SampleArrays.build(inputs, sample, where, mask_input, trim)
    n, lengths = data.samples, data.lengths
    seq = data.mask.shape[1] if data.mask is not None else 1
    held = holdout_indices(n, holdout)
    out = SampleChunks(samples=n, holdout_samples=len(held), mask_input=data.mask_input, trimmed=data.can_trim)
    for is_holdout in (False, True):
        members = np.array([i for i in range(n) if (i in held) == is_holdout], dtype=np.int64)
        members = members[np.argsort(lengths[members], kind="stable")]
        per_chunk = max(1, chunk_rows // max(1, seq))
        for start in range(0, members.size, per_chunk):
            idx = members[start : start + per_chunk]
            feeds, real, width = data.feeds(idx)
            out.chunks.append(Chunk(feeds, real, is_holdout, int(idx.size)))
            out.positions += int(idx.size) * seq
            out.computed_positions += int(idx.size) * (width if real is not None else 1)
            out.real_positions += int(real.sum()) if real is not None else int(idx.size)
    return out


def runs_trimmed(graph: object, feeds: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``graph`` (an OnnxGraph) runs on ``feeds``: an export may declare a dynamic sequence axis
    and still bake the traced length into a Reshape; then the padding must stay."""
    try:
        with torch.no_grad():
            graph.run(feeds)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure means: do not cut
        return False
    return True


def chunk_sample_for(graph: object, inputs: list[InputSpec], sample: Mapping[str, np.ndarray], where: str,
                     holdout: float = 0.2, chunk_rows: int = 4096, mask_input: str | None = MASK_INPUT) -> SampleChunks:
    """:func:`chunk_sample`, with the padding kept when ``graph`` does not run on a trimmed chunk."""
    chunks = chunk_sample(inputs, sample, where, holdout, chunk_rows, mask_input)
    if chunks.trimmed and chunks.chunks and not runs_trimmed(graph, chunks.chunks[0].feeds):
        chunks = chunk_sample(inputs, sample, where, holdout, chunk_rows, mask_input, trim=False)
    return chunks
