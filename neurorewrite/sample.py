"""Sample arrays keyed by name, read from an ``.npz`` file or taken from a mapping.

The one ``.npz`` reader: a missing, truncated or non-zip file is a DataError naming the option. Every
array must hold numbers, and every value must be finite: one NaN or infinity in a calibration sample
turns every refit weight into NaN, and in training data every trained weight, so a non-finite value
is refused with its array, row and column named rather than dropped (which rows to drop, or how to
repair them, is the user's decision, and a silently smaller sample changes what is fitted).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from neurorewrite.errors import DataError

_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError, MemoryError)


def load_sample(source: str | os.PathLike | Mapping[str, np.ndarray], option: str) -> dict[str, np.ndarray]:
    """The arrays of ``source`` (an ``.npz`` path, or a mapping of array-likes) by name.

    ``option`` (e.g. ``--data``) names where the file came from in error messages. Raises DataError for
    an unreadable file, an array that does not hold numbers, or a NaN/infinite value (see the module
    docstring).
    """
    where = f"{option}" if isinstance(source, Mapping) else f"{option} {os.fspath(source)}"
    if isinstance(source, Mapping):
        try:
            sample = {str(k): np.asarray(v) for k, v in source.items()}
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: the sample arrays are not arrays ({e})") from e
    else:
        sample = _read_npz(source, where)
    if not sample:
        raise DataError(f"{where}: the .npz file holds no arrays")
    for name, values in sample.items():
        check_values(values, f"{where}: array {name}")
    return sample


def _read_npz(source: str | os.PathLike, where: str) -> dict[str, np.ndarray]:
    if os.path.isdir(source):
        raise DataError(f"{where}: is a folder, not an .npz file")
    try:
        loaded = np.load(source, allow_pickle=False)
    except _READ_ERRORS as e:
        raise DataError(f"{where}: not a readable .npz file ({_short(e)})") from e
    if isinstance(loaded, np.ndarray):
        raise DataError(f"{where}: holds one unnamed array (.npy); save the sample with numpy.savez(path, NAME=array), "
                        "one array per model input")
    try:
        with loaded as data:
            return {k: data[k] for k in data.files}
    except _READ_ERRORS as e:
        raise DataError(f"{where}: not a readable .npz file ({_short(e)}); is the file complete?") from e


def _short(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_values(values: np.ndarray, where: str) -> None:
    """Raise DataError unless ``values`` holds real numbers (bool, int, float), all of them finite."""
    if values.dtype.kind not in "biuf":
        raise DataError(f"{where} has dtype {values.dtype}; samples must hold numbers (bool, int or float)")
    if values.dtype.kind != "f" or values.size == 0:
        return
    rows = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
    step = max(1, (1 << 24) // max(1, rows.shape[1]))  # rows at a time: the mask stays small
    bad_total, first = 0, None
    for start in range(0, rows.shape[0], step):
        bad = ~np.isfinite(rows[start:start + step])
        count = int(np.count_nonzero(bad))
        if count and first is None:
            r, c = np.argwhere(bad)[0]
            first = (start + int(r), int(c))
        bad_total += count
    if first is None:
        return
    r, flat = first
    value = rows[r, flat]
    column = flat if values.ndim <= 2 else tuple(int(i) for i in np.unravel_index(flat, values.shape[1:]))
    position = f"row {r}" if values.ndim <= 1 else f"row {r}, column {column}"
    raise DataError(f"{where} holds {bad_total} non-finite value(s), the first ({value}) at {position}; "
                    "fix or remove those rows")
