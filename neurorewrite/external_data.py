"""A model's weights in an external data file, written without ever serialising the whole ModelProto.

Protobuf refuses to serialise a message over 2 GiB, and serialising one near that size costs several
copies of it. :func:`write_split` instead streams every large initializer's bytes into a data file
(one tensor at a time) and serialises only a *header*: the model with each large initializer replaced
by a reference (location, offset, length) into that file. The caller's model is not modified.

The header is also what a runtime opens for a big model: onnxruntime reads (and, at aligned offsets,
memory-maps) the data file itself, so no copy of the weights passes through protobuf.

:func:`folder_lock` is the lock that makes a model and its data file one unit: writers publish a pair
under it exclusively, readers of this package take it shared while they read a pair.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

INLINE_LIMIT = 1024  # bytes: smaller tensors stay in the header (shapes, axes, small biases)
ALIGN_BIG = 1 << 16  # tensors of 1 MiB and more start at a 64 KiB boundary: onnxruntime can map them
ALIGN_SMALL = 64
# the data fields of a TensorProto: everything else (name, dims, type, doc) is copied to the reference
_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                          "uint64_data", "external_data", "data_location"})


def _copy_fields(src: Message, dst: Message, skip: frozenset[str] | tuple[str, ...]) -> None:
    for desc, value in src.ListFields():
        if desc.name in skip:
            continue
        if desc.is_repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.message_type is not None:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their shapes and types (serialising a large model
    to ask protobuf for its size would cost a copy of it, and fails above 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
        n = 1
        for d in t.dims:
            n *= d
        total += n * itemsize
    return total


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """The little-endian bytes of an initializer's values, as an external data file holds them."""
    if t.HasField("raw_data"):
        return t.raw_data
    values = numpy_helper.to_array(t)
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _goes_external(t: onnx.TensorProto) -> bool:
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or _external(t):
        return False
    n = 1
    for d in t.dims:  # from the shape: reading raw_data would copy it
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize >= INLINE_LIMIT


def write_split(model: onnx.ModelProto, data: BinaryIO, location: str) -> onnx.ModelProto:
    """Stream the main graph's large initializers into ``data`` and return the header that names them.

    ``location`` is the data file's name as the header records it (relative to the header's folder).
    Peak memory beyond ``model``: one tensor's bytes. ``model`` itself is left as it was.
    """
    header = onnx.ModelProto()
    _copy_fields(model, header, skip=("graph",))
    _copy_fields(model.graph, header.graph, skip=("initializer",))
    offset = data.tell()
    for t in model.graph.initializer:
        if not _goes_external(t):
            header.graph.initializer.add().CopyFrom(t)
            continue
        raw = tensor_bytes(t)
        align = ALIGN_BIG if len(raw) >= 1 << 20 else ALIGN_SMALL
        pad = (-offset) % align
        if pad:
            data.write(b"\0" * pad)
            offset += pad
        data.write(raw)
        ref = header.graph.initializer.add()
        _copy_fields(t, ref, skip=_DATA_FIELDS)
        ref.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            ref.external_data.add(key=key, value=value)
        offset += len(raw)
        del raw
    return header


def write_pair(model: onnx.ModelProto, folder: Path, name: str, data_name: str, sync: bool = False) -> onnx.ModelProto:
    """Write ``folder/name`` (the header) and ``folder/data_name`` (the weights); returns the header.

    With ``sync`` both files are flushed to disk before this returns (a crash cannot leave a renamed
    model whose bytes never reached the disk).
    """
    with open(folder / data_name, "wb") as data:
        header = write_split(model, data, data_name)
        if sync:
            data.flush()
            os.fsync(data.fileno())
    write_proto(header, folder / name, sync)
    return header


def write_proto(model: onnx.ModelProto, path: Path, sync: bool = False) -> None:
    """Serialise ``model`` (which must be under 2 GiB) to ``path``."""
    payload = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(payload)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def locations(header: onnx.ModelProto) -> list[str]:
    """The external data files the main graph's initializers name, in first-use order."""
    seen: dict[str, None] = {}
    for t in header.graph.initializer:
        if _external(t):
            for e in t.external_data:
                if e.key == "location":
                    seen[e.value] = None
    return list(seen)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, shared: bool) -> Iterator[None]:
    """Hold ``flock`` on ``folder`` (shared for readers, exclusive for a writer publishing a pair).

    A lock that cannot be taken (a folder that cannot be opened, a filesystem without flock) is skipped:
    the unique data file names still keep pairs from mixing; the lock only closes the window in which a
    reader could find the old model after a writer removed its data. The kernel drops the lock when the
    holder dies, so a killed writer never blocks the next one.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (best effort: some filesystems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
