"""Writing a model as a header plus one external data file, without serialising the whole ModelProto."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import numpy_helper

from neurorewrite.external_data.common import _DATA_FIELDS, _copy_fields, _external, _nbytes
from neurorewrite.external_data.spill import _copy_spilled, _inline, _linked, spilled

INLINE_LIMIT = 1024  # bytes: smaller tensors stay in the header (shapes, axes, small biases)
ALIGN_BIG = 1 << 16  # tensors of 1 MiB and more start at a 64 KiB boundary: onnxruntime can map them
ALIGN_SMALL = 64
def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """The little-endian bytes of an initializer's values, as an external data file holds them."""
    if t.HasField("raw_data"):
        return t.raw_data
    values = numpy_helper.to_array(t)
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def _goes_external(t: onnx.TensorProto) -> bool:
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or (_external(t) and not spilled(t)):
        return False
    n = 1
    for d in t.dims:  # from the shape: reading raw_data would copy it
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize >= INLINE_LIMIT


def write_split(model: onnx.ModelProto, data: BinaryIO | None, location: str | None,
                link_into: Path | None = None) -> onnx.ModelProto:
    """Stream the main graph's large initializers into ``data`` and return the header that names them.

    ``location`` is the data file's name as the header records it (relative to the header's folder).
    Spilled tensors are copied from their files. With ``data`` None nothing goes outside: the header
    is the whole model, spilled tensors inlined. With ``link_into`` (the header's folder, for a
    session that only reads the files) each spilled tensor is hard-linked there under its own name
    instead of copied (a copy where links are impossible). Peak memory beyond ``model``: one chunk or
    one tensor's bytes. ``model`` itself is left as it was.
    """
    header = onnx.ModelProto()
    _copy_fields(model, header, skip=("graph",))
    _copy_fields(model.graph, header.graph, skip=("initializer",))
    offset = 0 if data is None else data.tell()
    for t in model.graph.initializer:
        if data is None or not _goes_external(t):
            header.graph.initializer.add().CopyFrom(_inline(t) if spilled(t) else t)
            continue
        if link_into is not None and spilled(t):
            header.graph.initializer.add().CopyFrom(_linked(t, link_into))
            continue
        size = _nbytes(t)
        align = ALIGN_BIG if size >= 1 << 20 else ALIGN_SMALL
        pad = (-offset) % align
        if pad:
            data.write(b"\0" * pad)
            offset += pad
        if spilled(t):
            length = _copy_spilled(t, data)
        else:
            raw = tensor_bytes(t)
            data.write(raw)
            length = len(raw)
            del raw
        ref = header.graph.initializer.add()
        _copy_fields(t, ref, skip=_DATA_FIELDS)
        ref.data_location = onnx.TensorProto.EXTERNAL
        assert location is not None
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            ref.external_data.add(key=key, value=value)
        offset += length
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
                if e.key == "location" and isinstance(e.value, str):  # a damaged name is bytes
                    seen[e.value] = None
    return list(seen)


