"""What the other modules of this room share: copying a message's fields, a tensor's size and its
external-data entry, removing the folders of dead writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable

import onnx
from google.protobuf.message import Message

# the data fields of a TensorProto: everything else (name, dims, type, doc) is copied to the reference
_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                          "uint64_data", "external_data", "data_location"})
COPY_CHUNK = 64 << 20  # bytes copied at a time between files


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


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_info(t: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in t.external_data}
    return info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", -1))


def _nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize




def remove_dead_folders(root: str | os.PathLike, wanted: Callable[[os.DirEntry], bool]) -> None:
    """Remove the folders under ``root`` that ``wanted`` picks and whose owner has died: each live owner
    holds an exclusive ``flock`` on its folder, so a lock that can be taken is a dead owner's."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not wanted(entry) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass  # a live owner holds it
            finally:
                os.close(fd)
