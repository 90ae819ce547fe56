"""Loading ONNX models: typed errors for bad files (damaged text, missing or short external data, the
checker's refusals), the files a model reads, and NaN/inf weights reported.

Saving, and the order in which a model and its data file are published, live in
:mod:`neurorewrite.rewriter.publish` (``save_model`` is re-exported here).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_tensor
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from neurorewrite.errors import (
    ModelLoadError,
    NeurorewriteWarning,
    first_line,
)
import neurorewrite.external_data.spill as spill_files
from neurorewrite.external_data import (
    folder_lock,
    has_spilled,
    locations,
    spill_copy,
    spilled,
    tensor_chunks,
    weight_bytes,
    write_pair,
)

# Protobuf cannot serialise a message over 2 GiB, and serialising one near that size costs several
# copies of it in memory; above this many weight bytes the weights go to a data file beside the model.
EXTERNAL_DATA_THRESHOLD = 1 << 30
HEADER_SCAN_LIMIT = 256 << 20  # a model file bigger than this holds its weights inline: no data files to list
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
    if header is not None:  # a damaged name (a NUL byte) is no path to compare: loading refuses it
        out += [(f"the external data of {label} {os.fspath(path)}:", f) for f in data_files(header, path)
                if "\x00" not in str(f)]
    return out


def _small_enough_to_scan(path: str | os.PathLike) -> bool:
    try:
        return os.path.getsize(path) <= HEADER_SCAN_LIMIT
    except OSError:
        return False


# --- loading ----------------------------------------------------------------------------------------


def _spill_threshold() -> int:  # read at call time: tests lower it
    return spill_files.SPILL_THRESHOLD


def load_model(source: ModelLike, check: bool = True, warn: bool = True, full_check: bool = False,
               spill: bool = False) -> onnx.ModelProto:
    """Read an ONNX model (external data included) and run the ONNX checker on it.

    Raises ModelLoadError naming the file for a missing, non-ONNX, truncated or invalid model, or a
    missing or short external data file. Warns (:class:`NeurorewriteWarning`) when a weight is NaN or
    infinite (unless ``warn`` is False: the caller scans with :func:`warn_nonfinite` itself). With
    ``full_check`` the checker also runs strict shape inference (a Gemm whose weight does not fit its
    input is refused here rather than deep in a pass). With ``spill``, external tensors of
    :data:`~neurorewrite.external_data.SPILL_THRESHOLD` bytes or more are copied file to file into this
    process's spill folder instead of into protobuf (:func:`~neurorewrite.external_data.spill_copy`): a
    2 GiB model then costs no memory until its weights are read, and reading maps them. Such a model is
    private to this process (save it with ``save_model``). An in-memory ModelProto is checked and
    returned as is (callers must not mutate it).
    """
    if isinstance(source, onnx.ModelProto):
        if check:
            _check_in_memory(source, "<in-memory model>", full_check)
        if warn:
            warn_nonfinite(source, "the model")
        return source
    path = Path(source)
    folder = path.parent  # Path("m.onnx").parent is Path(".")
    with folder_lock(folder, shared=True):
        model = check_model_file(path, check, full_check)
        if uses_external_data(model):
            try:
                for t in model.graph.initializer:
                    if t.data_location != onnx.TensorProto.EXTERNAL:
                        continue
                    if spill and _declared_bytes(t) >= _spill_threshold():
                        spill_copy(t, folder)
                    else:  # as onnx.load_external_data_for_model does, one tensor at a time
                        load_external_data_for_tensor(t, str(folder))
                        t.data_location = onnx.TensorProto.DEFAULT
                        del t.external_data[:]
            except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
                # onnx refuses some files the size checks pass (a symbolic link) with a ValidationError
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
        if "\x00" in location:
            raise ModelLoadError(f"{path}: tensor {t.name} names external data {location!r}, which is not a file "
                                 "name; is the file damaged?")
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


def _check_path(path: Path, label: str, full_check: bool) -> None:
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
    """``(tensor, count)`` for every float initializer or Constant holding NaN or infinite values (a
    scalar holding -inf or inf, the attention-mask idiom, counts only if NaN).

    Every tensor's data is also checked against its declared shape (a damaged file whose data does
    not fill its shape is a ModelLoadError naming ``label`` and the tensor).
    """
    found = []
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value"]  # a Constant's tensor is usually unnamed: name it by its output
    for name, t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL and not spilled(t):
            continue
        try:
            chunks = tensor_chunks(t)
            first = next(chunks, None)
        except Exception as e:  # noqa: BLE001  (onnx raises ValueError, TypeError, KeyError... for damaged tensors)
            raise ModelLoadError(f"{label}: tensor {name}: its data does not match its type and shape "
                                 f"{list(t.dims)} ({first_line(e)}); is the file damaged?") from e
        if t.data_type not in FLOAT_TYPES or first is None:
            continue
        # in chunks: no full-size boolean mask, and a spilled tensor is read, not mapped whole. A scalar
        # -inf is the attention-mask idiom (Where(mask, x, -inf)): only NaN counts in a scalar
        scalar = math.prod(t.dims) == 1
        bad = sum(int(np.count_nonzero(np.isnan(c) if scalar else ~np.isfinite(c))) for c in itertools.chain([first], chunks))
        if bad:
            found.append((name, bad))
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


# save_model lives beside the publishing protocol; importers of this module keep finding it here
from neurorewrite.rewriter.publish import replaced_files, save_model  # noqa: E402
