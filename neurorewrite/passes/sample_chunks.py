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

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models.onnx_module import InputSpec

MASK_INPUT = "attention_mask"


@dataclass
class Chunk:
    feeds: dict[str, torch.Tensor]
    real: torch.Tensor | None  # bool (samples, positions): which positions are rows; None: all are
    holdout: bool
    samples: int

    def rows(self, tensor: torch.Tensor, features: int) -> torch.Tensor:
        """``tensor`` as ``(rows, features)``, padding positions left out."""
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

    @property
    def fit(self) -> list[Chunk]:
        return [c for c in self.chunks if not c.holdout]

    @property
    def held_out(self) -> list[Chunk]:
        return [c for c in self.chunks if c.holdout]


def _np_dtype(spec: InputSpec) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(spec.elem_type))


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
        arrays[spec.name] = value.astype(_np_dtype(spec), copy=False)
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


def chunk_sample(
    inputs: list[InputSpec], sample: Mapping[str, np.ndarray], where: str, holdout: float = 0.2,
    chunk_rows: int = 4096, mask_input: str | None = MASK_INPUT, trim: bool = True,
) -> SampleChunks:
    """Validate ``sample`` against ``inputs`` and cut it into chunks; see the module docstring."""
    if not 0.0 <= holdout < 1.0:
        raise InvalidOptionError(f"--holdout must be in [0, 1), got {holdout}")
    arrays = check_sample(inputs, sample, where)
    n = len(next(iter(arrays.values())))
    if n < 2:
        raise DataError(f"{where}: the sample needs at least 2 rows, it has {n}")
    mask = arrays.get(mask_input) if mask_input else None
    if mask is not None and mask.ndim != 2:
        mask = None
    seq = mask.shape[1] if mask is not None else 1
    out = SampleChunks(samples=n, mask_input=mask_input if mask is not None else None)
    lengths = _lengths(mask) if mask is not None else np.ones(n, dtype=np.int64)
    # trailing padding can be cut when every input of shape (samples, seq, ...) has a dynamic seq axis
    seq_inputs = [s for s in inputs if mask is not None and arrays[s.name].ndim >= 2 and arrays[s.name].shape[:2] == mask.shape]
    can_trim = trim and mask is not None and all(len(s.shape) > 1 and s.shape[1] is None for s in seq_inputs)
    n_hold = int(round(n * holdout))
    held = set(np.linspace(0, n - 1, n_hold).round().astype(int).tolist()) if n_hold else set()
    out.holdout_samples = len(held)
    for is_holdout in (False, True):
        members = np.array([i for i in range(n) if (i in held) == is_holdout], dtype=np.int64)
        if members.size == 0:
            continue
        members = members[np.argsort(lengths[members], kind="stable")]
        per_chunk = max(1, chunk_rows // max(1, seq))
        for start in range(0, members.size, per_chunk):
            idx = members[start : start + per_chunk]
            width = int(lengths[idx].max()) if can_trim else seq
            width = max(width, 1)
            feeds = {}
            for spec in inputs:
                value = arrays[spec.name][idx]
                if can_trim and spec in seq_inputs:
                    value = value[:, :width]
                feeds[spec.name] = torch.from_numpy(np.ascontiguousarray(value))
            real = None
            if mask is not None:
                real = torch.from_numpy(np.ascontiguousarray(mask[idx][:, :width] != 0))
            out.chunks.append(Chunk(feeds, real, is_holdout, int(idx.size)))
            out.positions += int(idx.size) * seq
            out.computed_positions += int(idx.size) * (width if mask is not None else 1)
            out.real_positions += int(real.sum()) if real is not None else int(idx.size)
    return out
