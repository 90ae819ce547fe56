"""Saving a model, and publishing it with its external data as one unit.

A model over :data:`~neurorewrite.rewriter.io.EXTERNAL_DATA_THRESHOLD` bytes of weights (or one whose
input kept its weights outside) is written as a small header plus one data file with a name no other
write uses, ``<model>.<16 hex digits>.data`` (:mod:`neurorewrite.external_data`: no protobuf over
2 GiB is ever serialised). Publishing is ordered so that a reader never pairs a model with another
write's data:

1. header and data are written into a private temporary folder beside the output and checked there;
2. under an exclusive lock on the output's folder the data file is renamed to its unique name first,
   then the header over the output (the one atomic step that switches readers to the new pair);
3. still under the lock, the data files of the replaced model (and those of writers that were killed
   before step 2 finished) are removed.

A ``kill -9`` before step 2's second rename leaves the old pair working (plus an unused data file or
a temporary folder, both removed by the next write to the same output); after it, the new pair works.
Two writers publish one after the other. :func:`~neurorewrite.rewriter.io.load_model` reads a pair
under a shared lock on its folder, so it never sees the model of one write after another write
removed that model's data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from neurorewrite.errors import ModelLoadError, OutputError, VerificationError, first_line
from neurorewrite.external_data import folder_lock, fsync_folder, has_spilled, locations, write_pair, write_proto, write_split
from neurorewrite.external_data.common import remove_dead_folders
from neurorewrite.paths import check_output_target
from neurorewrite.rewriter.io import (
    EXTERNAL_DATA_THRESHOLD,
    _small_enough_to_scan,
    read_header,
    uses_external_data,
    weight_bytes,
)


def replaced_files(path: str | os.PathLike, label: str = "-o") -> list[tuple[str, Path]]:
    """``(label, path)`` for the output and every file that publishing a model there removes: the
    replaced model's data files and unused data files of earlier writes (see the module docstring)."""
    path = Path(path)
    return [(label, path)] + [(f"the old external data of {label} {os.fspath(path)}:", f) for f in _stale_data(path)]


def _own_data_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"\.[0-9a-f]{16}\.data")


def _stale_data(path: Path) -> list[Path]:
    """Data files beside ``path`` that belong to the model now at ``path`` or to earlier writes of it.

    The model's own references count only when the file's name starts with the model's name (a data
    file it shares with other models is never removed); unused ``<name>.<hex>.data`` files are what a
    killed writer left.
    """
    folder = path.parent if str(path.parent) else Path(".")
    name = path.name
    found: dict[Path, None] = {}
    if path.is_file() and _small_enough_to_scan(path):
        with contextlib.suppress(ModelLoadError):
            for location in locations(read_header(path)):
                if Path(location).name == location and location.startswith(name + ".") and location.endswith(".data"):
                    found[folder / location] = None
    pattern = _own_data_pattern(name)
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found[folder / entry.name] = None
    return [f for f in found if f.exists()]


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
               sync: bool = True) -> Path:
    """Write ``model`` to ``path``: checked, then published with its data file as one unit.

    With ``external_data`` (default: when the weights are too big for one protobuf) the weights go to
    ``<name>.<unique>.data`` beside the model (see the module docstring for the order of the renames).
    The model is verified with the full ONNX checker on disk before anything is renamed, so an
    invalid model never replaces anything. ``sync`` flushes the files to disk before the renames.
    ``model`` is not modified.
    """
    path = Path(path)
    folder = Path(os.path.abspath(path.parent if str(path.parent) else "."))
    name = path.name
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    check_output_target(path, "-o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder {path.parent} is not writable")
    if external_data is None:
        external_data = uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    with _private_folder(folder, name) as tmp:
        data_name = f"{name}.{secrets.token_hex(8)}.data" if external_data else None
        try:
            if data_name is not None:
                if not locations(write_pair(model, tmp, name, data_name, sync=sync)):
                    (tmp / data_name).unlink()  # every tensor was small enough to stay inline
                    data_name = None
            else:
                if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
                    raise OutputError(f"{path}: the weights are too big for one file; save with external data")
                write_proto(write_split(model, None, None) if has_spilled(model) else model, tmp / name, sync=sync)
        except OSError as e:
            raise OutputError(f"{path}: could not write the model ({e.strerror or e}); nothing was written") from e
        except ValueError as e:  # protobuf refuses a message over 2 GiB
            raise OutputError(f"{path}: could not serialise the model ({first_line(e)}); nothing was written") from e
        try:
            onnx.checker.check_model(str(tmp / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
            raise VerificationError(f"{path}: the written model fails the ONNX checker, nothing written: {first_line(e)}") from e
        _crash_point("written")
        _publish(tmp, folder, name, data_name, sync)
    return path


CRASH_ENV = "NEUROREWRITE_TEST_KILL_AT"


def _crash_point(step: str) -> None:
    """Fault injection for the tests: ``NEUROREWRITE_TEST_KILL_AT=<step>`` makes this process SIGKILL
    itself at that step of a save (``written``, ``data-renamed``, ``model-renamed``, ``cleaned``)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _private_folder(folder: Path, name: str) -> Iterator[Path]:
    """A temporary folder beside the output, locked for as long as this writer lives (a later writer
    removes it only when the lock is free, i.e. its writer died)."""
    with folder_lock(folder, shared=True):  # cleanup (exclusive) cannot see it before it is locked
        try:
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=".tmp"))
        except OSError as e:
            raise OutputError(f"{folder / name}: cannot write in {folder} ({e.strerror or e})") from e
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def _publish(tmp: Path, folder: Path, name: str, data_name: str | None, sync: bool) -> None:
    """Rename the data file, then the model, into ``folder``; remove what the old model used."""
    target = folder / name
    try:
        with folder_lock(folder, shared=False):
            stale = _stale_data(target)
            if data_name is not None:
                if (folder / data_name).exists():  # 64 random bits: only a deliberate plant gets here
                    raise OutputError(f"{target}: {data_name} already exists; nothing was written")
                os.rename(tmp / data_name, folder / data_name)
                _crash_point("data-renamed")
            os.replace(tmp / name, target)
            if sync:
                fsync_folder(folder)
            _crash_point("model-renamed")
            for old in stale:
                if old.name != data_name:
                    with contextlib.suppress(OSError):
                        old.unlink()
            _remove_dead_writers(folder, name, tmp)
            _crash_point("cleaned")
    except OSError as e:
        raise OutputError(f"{target}: could not publish the model ({e.strerror or e})") from e


def _remove_dead_writers(folder: Path, name: str, own: Path) -> None:
    """Remove temporary folders of earlier writes of ``name`` whose writer has died (lock free)."""
    prefix = f".{name}."
    remove_dead_folders(folder, lambda entry: entry.name.startswith(prefix) and entry.name.endswith(".tmp")
                        and entry.path != str(own))
