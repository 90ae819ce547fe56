"""Loading and saving ONNX models: typed errors for bad files, external data, and a model and its data
published together or not at all.

A model over :data:`EXTERNAL_DATA_THRESHOLD` bytes of weights (or one whose input kept its weights
outside) is written as a small header plus one data file with a name no other write uses,
``<model>.<16 hex digits>.data`` (:mod:`neurorewrite.external_data`: no protobuf over 2 GiB is ever
serialised). Publishing is ordered so that a reader never pairs a model with another write's data:

1. header and data are written into a private temporary folder beside the output and checked there;
2. under an exclusive lock on the output's folder the data file is renamed to its unique name first,
   then the header over the output (the one atomic step that switches readers to the new pair);
3. still under the lock, the data files of the replaced model (and those of writers that were killed
   before step 2 finished) are removed.

A ``kill -9`` before step 2's second rename leaves the old pair working (plus an unused data file or
a temporary folder, both removed by the next write to the same output); after it, the new pair works.
Two writers publish one after the other. :func:`load_model` reads a pair under a shared lock on its
folder, so it never sees the model of one write after another write removed that model's data.
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
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from neurorewrite.errors import (
    ModelLoadError,
    NeurorewriteWarning,
    OutputError,
    VerificationError,
    first_line,
)
from neurorewrite.external_data import (
    folder_lock,
    fsync_folder,
    has_spilled,
    locations,
    spilled,
    tensor_array,
    weight_bytes,
    write_pair,
    write_proto,
    write_split,
)

# Protobuf cannot serialise a message over 2 GiB, and serialising one near that size costs several
# copies of it in memory; above this many weight bytes the weights go to a data file beside the model.
EXTERNAL_DATA_THRESHOLD = 1 << 30
HEADER_SCAN_LIMIT = 256 << 20  # an existing output bigger than this holds its weights inline: no data to clean
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

ModelLike = onnx.ModelProto | str | os.PathLike


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether initializers refer to an external data file (this process's spilled tensors aside)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL and not spilled(t) for t in model.graph.initializer)


def read_header(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at ``path`` without its external data (cheap for a model that keeps its weights outside)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, TypeError, Exception) as e:  # noqa: BLE001
        # onnx picks a parser by the file's suffix (.json, .txt, ...): each raises its own error types
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(e)}); is the file complete?") from e


def stored_with_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file keeps its weights in external data files (read without loading them)."""
    return uses_external_data(read_header(path))


def data_files(header: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """The external data files the model at ``path`` reads (its header given), as paths."""
    folder = Path(path).parent
    return [folder / location for location in locations(header)]


def model_files(path: str | os.PathLike, label: str = "the model") -> list[tuple[str, Path]]:
    """``(label, path)`` for a model file and each external data file it reads, for the collision rule
    (:func:`neurorewrite.paths.check_no_overwrite`). An unreadable model is listed alone: loading it
    will say what is wrong."""
    out = [(label, Path(path))]
    try:
        header = read_header(path) if Path(path).is_file() and _small_enough_to_scan(path) else None
    except ModelLoadError:
        header = None
    if header is not None:
        out += [(f"the external data of {label} {os.fspath(path)}:", f) for f in data_files(header, path)]
    return out


def replaced_files(path: str | os.PathLike, label: str = "-o") -> list[tuple[str, Path]]:
    """``(label, path)`` for the output and every file that publishing a model there removes: the
    replaced model's data files and unused data files of earlier writes (see the module docstring)."""
    path = Path(path)
    return [(label, path)] + [(f"the old external data of {label} {os.fspath(path)}:", f) for f in _stale_data(path)]


def _small_enough_to_scan(path: str | os.PathLike) -> bool:
    try:
        return os.path.getsize(path) <= HEADER_SCAN_LIMIT
    except OSError:
        return False


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


# --- loading ----------------------------------------------------------------------------------------


def load_model(source: ModelLike, check: bool = True, warn: bool = True, full_check: bool = False) -> onnx.ModelProto:
    """Read an ONNX model (external data included) and run the ONNX checker on it.

    Raises ModelLoadError naming the file for a missing, non-ONNX, truncated or invalid model, or a
    missing or short external data file. Warns (:class:`NeurorewriteWarning`) when a weight is NaN or
    infinite (unless ``warn`` is False: the caller scans with :func:`warn_nonfinite` itself). With
    ``full_check`` the checker also runs strict shape inference (a Gemm whose weight does not fit its
    input is refused here rather than deep in a pass). An in-memory ModelProto is checked and returned
    as is (callers must not mutate it).
    """
    if isinstance(source, onnx.ModelProto):
        if check:
            _check_in_memory(source, "<in-memory model>", full_check)
        if warn:
            warn_nonfinite(source, "the model")
        return source
    path = Path(source)
    folder = path.parent if str(path.parent) else Path(".")
    with folder_lock(folder, shared=True):
        model = check_model_file(path, check, full_check)
        if uses_external_data(model):
            try:
                onnx.load_external_data_for_model(model, str(folder))
            except (OSError, ValueError, RuntimeError) as e:
                raise ModelLoadError(f"{path}: cannot read its external data ({first_line(e)})") from e
    if warn:
        warn_nonfinite(model, str(path))
    return model


def check_model_file(path: str | os.PathLike, check: bool = True, full_check: bool = False) -> onnx.ModelProto:
    """Validate the model file at ``path`` without loading its external data; returns its header.

    Raises ModelLoadError for a missing, non-ONNX or truncated file, missing or short external data,
    or (with ``check``) a model the ONNX checker rejects (unsorted or cyclic graphs included).
    """
    path = Path(path)
    model = read_header(path)
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found); is the file complete?")
    bad_text = _undecodable_text(model)
    if bad_text:
        raise ModelLoadError(f"{path}: the {bad_text} is not valid UTF-8 text; is the file damaged?")
    check_data_files(model, path)
    if check:
        _check_path(path, str(path), full_check)
    return model


def _undecodable_text(message: Message, where: str = "model") -> str | None:
    """The first string field of ``message`` (recursively) that protobuf could not decode as UTF-8.

    ONNX's protobuf is proto2, so a damaged name parses and comes back as ``bytes`` instead of ``str``;
    everything downstream (paths, JSON, lookups) would trip over it. Bytes fields (raw weights) are
    never read here: reading them would copy them.
    """
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            values = getattr(message, field.name)
            for value in (values if field.is_repeated else [values]):
                if not isinstance(value, str):
                    return f"{field.name} of a {where}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                children = getattr(message, field.name)
            elif message.HasField(field.name):
                children = [getattr(message, field.name)]
            else:
                continue
            for child in children:
                found = _undecodable_text(child, field.message_type.name)
                if found:
                    return found
    return None


def check_data_files(header: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Every external data reference of ``header`` (the model at ``path``) must name a regular file
    beside the model that holds the bytes it promises; else a ModelLoadError naming the file."""
    folder = Path(path).parent
    sizes: dict[str, int] = {}
    for t in header.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise ModelLoadError(f"{path}: tensor {t.name} names external data {location!r} outside the model's folder")
        data = folder / location
        if location not in sizes:
            if not data.is_file():
                what = "is missing" if not data.exists() else "is not a file"
                raise ModelLoadError(f"{path}: its external data file {data} {what} (tensor {t.name}); "
                                     "copy the model together with its data file")
            sizes[location] = data.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
            need = _declared_bytes(t)
        except (ValueError, TypeError, KeyError):
            raise ModelLoadError(f"{path}: tensor {t.name} has a malformed type, offset or length") from None
        if offset < 0 or (length is not None and length != need):
            raise ModelLoadError(f"{path}: tensor {t.name} has shape {list(t.dims)} ({need} bytes) but its external "
                                 f"data entry says offset {offset}, length {length}; is the file damaged?")
        end = offset + need
        if end > sizes[location]:
            raise ModelLoadError(f"{path}: its external data file {data} is truncated ({sizes[location]} bytes; "
                                 f"tensor {t.name} needs {end})")


def _declared_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise ValueError(f"negative dimension {d}")
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _check_path(path: Path, label: str, full_check: bool = False) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError, OSError) as e:
        raise ModelLoadError(f"{label}: the ONNX checker rejects this model: {first_line(e)}") from e


def checkable_in_memory(model: onnx.ModelProto) -> bool:
    """Whether the ONNX checker can take ``model`` itself: not too big, and no spilled tensor (the checker
    refuses their absolute paths; :func:`check_in_memory` checks those through a written copy)."""
    return weight_bytes(model) < EXTERNAL_DATA_THRESHOLD and not has_spilled(model)


def check_in_memory(model: onnx.ModelProto, label: str = "<in-memory model>", full_check: bool = False) -> None:
    """Run the ONNX checker on an in-memory model of any size; ModelLoadError if it fails."""
    _check_in_memory(model, label, full_check)


def _check_in_memory(model: onnx.ModelProto, label: str, full_check: bool = False) -> None:
    if checkable_in_memory(model):
        try:
            onnx.checker.check_model(model, full_check=full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
            raise ModelLoadError(f"{label}: the ONNX checker rejects this model: {first_line(e)}") from e
        return
    with tempfile.TemporaryDirectory(prefix="neurorewrite-check.") as tmp:  # too big to hand over in memory
        write_pair(model, Path(tmp), "model.onnx", "model.onnx.data")
        _check_path(Path(tmp) / "model.onnx", label, full_check)


def nonfinite_weights(model: onnx.ModelProto, label: str = "the model") -> list[tuple[str, int]]:
    """``(tensor, count)`` for every float initializer or Constant holding NaN or infinite values.

    Every tensor's data is also checked against its declared shape (a damaged file whose data does
    not fill its shape is a ModelLoadError naming ``label`` and the tensor).
    """
    found = []
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL and not spilled(t):
            continue
        try:
            values = tensor_array(t).reshape(-1)
        except Exception as e:  # noqa: BLE001  (onnx raises ValueError, TypeError, KeyError... for damaged tensors)
            raise ModelLoadError(f"{label}: tensor {t.name}: its data does not match its type and shape "
                                 f"{list(t.dims)} ({first_line(e)}); is the file damaged?") from e
        if t.data_type not in FLOAT_TYPES:
            continue
        bad = sum(int(np.count_nonzero(~np.isfinite(values[start:start + (1 << 24)])))
                  for start in range(0, values.size, 1 << 24))  # in chunks: no full-size boolean mask
        if bad:
            found.append((t.name, bad))
    return found


def warn_nonfinite(model: onnx.ModelProto, label: str) -> list[tuple[str, int]]:
    """Warn once per call when ``model`` holds NaN/inf weights; returns what :func:`nonfinite_weights` found."""
    found = nonfinite_weights(model, label)
    if found:
        warnings.warn(nonfinite_message(label, found), NeurorewriteWarning, stacklevel=3)
    return found


def nonfinite_message(label: str, found: list[tuple[str, int]]) -> str:
    name, count = found[0]
    more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
    return f"{label}: weight {name} holds {count} NaN/infinite value(s){more}; outputs that depend on it are not finite"


# --- saving -----------------------------------------------------------------------------------------


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
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name such as {path / 'model.onnx'}")
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
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")) or entry.path == str(own):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a live writer holds it
            shutil.rmtree(entry.path, ignore_errors=True)
            os.close(fd)


def write_split_to(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Write ``model`` as header + data into ``folder`` (a private temporary folder) for a runtime to
    open by path; returns the header's path. For models too big to hand over as bytes."""
    write_pair(model, folder, name, name + ".data")
    return folder / name


__all__ = [
    "EXTERNAL_DATA_THRESHOLD", "ModelLike", "check_data_files", "data_files", "load_model", "model_files",
    "nonfinite_weights", "read_header", "replaced_files", "save_model", "stored_with_external_data",
    "uses_external_data", "warn_nonfinite", "weight_bytes", "write_split", "write_split_to",
]
