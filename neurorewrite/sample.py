"""Sample arrays keyed by name, read from an ``.npz`` file or taken from a mapping.

The one ``.npz`` reader: a missing, truncated or non-zip file is a DataError naming the option.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np

from neurorewrite.errors import DataError


def load_sample(source: str | os.PathLike | Mapping[str, np.ndarray], option: str) -> dict[str, np.ndarray]:
    """The arrays of ``source`` (an ``.npz`` path, or a mapping of array-likes) by name.

    ``option`` (e.g. ``--data``) names where the file came from in error messages.
    """
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}
    try:
        with np.load(source, allow_pickle=False) as data:
            sample = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{option} {source}: not a readable .npz file ({e})") from e
    if not sample:
        raise DataError(f"{option} {source}: the .npz file holds no arrays")
    return sample
