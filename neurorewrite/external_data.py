"""A model's weights in an external data file, written without ever serialising the whole ModelProto.

Protobuf refuses to serialise a message over 2 GiB, and serialising one near that size costs several
copies of it. :func:`write_split` instead streams every large initializer's bytes into a data file
(one tensor at a time) and serialises only a *header*: the model with each large initializer replaced
by a reference (location, offset, length) into that file. The caller's model is not modified.

The header is also what a runtime opens for a big model: onnxruntime reads (and, at aligned offsets,
memory-maps) the data file itself, so no copy of the weights passes through protobuf.

Big tensors that a pass *makes* never enter protobuf at all: :func:`make_tensor` writes an array of
:data:`SPILL_THRESHOLD` bytes or more into a file of this process's spill folder and returns a
TensorProto that refers to it by absolute path (a *spilled* tensor); :func:`tensor_array` maps it
back read-only. Turning an array into protobuf bytes costs two copies of it, and a pass that widens a
2 GiB model fourfold would need 8 GiB of them; spilled, it costs none. Spilled tensors are private to
the process: :func:`write_split` copies their bytes into the written data file (or inlines them), and
:func:`materialize` loads them into the protobuf for code that reads initializers itself (TVM's importer).
The spill folder is removed when the process exits (and, if it was killed, by the next process).

:func:`folder_lock` is the lock that makes a model and its data file one unit: writers publish a pair
under it exclusively, readers of this package take it shared while they read a pair.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

INLINE_LIMIT = 1024  # bytes: smaller tensors stay in the header (shapes, axes, small biases)
ALIGN_BIG = 1 << 16  # tensors of 1 MiB and more start at a 64 KiB boundary: onnxruntime can map them
ALIGN_SMALL = 64
SPILL_THRESHOLD = 64 << 20  # bytes: a pass's new tensor this big goes to a spill file, not into protobuf
SPILL_PREFIX = "neurorewrite-spill."
COPY_CHUNK = 64 << 20
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


def spilled(t: onnx.TensorProto) -> bool:
    """Whether ``t`` is a spilled tensor (external data at an absolute path: see the module docstring)."""
    return _external(t) and any(e.key == "location" and os.path.isabs(e.value) for e in t.external_data)


def has_spilled(model: onnx.ModelProto) -> bool:
    return any(spilled(t) for t in model.graph.initializer)


class _SpillFolder:
    """This process's spill folder, made on first use, locked while the process lives, removed at exit."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.pid = 0
        self.fd: int | None = None
        self.counter = itertools.count()

    def get(self) -> Path:
        if self.path is None or self.pid != os.getpid():  # a forked child makes its own
            _remove_dead_spills()
            self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX))
            self.pid = os.getpid()
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            atexit.register(self.remove, self.path, self.pid)
        return self.path

    @staticmethod
    def remove(path: Path, pid: int) -> None:
        if os.getpid() == pid:
            shutil.rmtree(path, ignore_errors=True)


_SPILL = _SpillFolder()


def _remove_dead_spills() -> None:
    """Remove spill folders of processes that died without cleaning up (their lock is free)."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not entry.name.startswith(SPILL_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass  # alive
            finally:
                os.close(fd)


def make_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer holding ``value``: spilled when it has :data:`SPILL_THRESHOLD` bytes or more and a
    plain numeric type, else an ordinary TensorProto (``numpy_helper.from_array``)."""
    if value.nbytes < SPILL_THRESHOLD or value.dtype.kind not in "biuf" or value.dtype.byteorder == ">":
        return numpy_helper.from_array(value, name)
    path = _SPILL.get() / f"{next(_SPILL.counter)}.bin"
    with open(path, "wb") as f:
        _write_array(value, f)
    t = onnx.TensorProto(name=name, dims=list(value.shape), data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, v in (("location", str(path)), ("offset", "0"), ("length", str(value.nbytes))):
        t.external_data.add(key=key, value=v)
    return t


def spill_copy(t: onnx.TensorProto, base: str | os.PathLike) -> None:
    """Turn ``t``, an external tensor of the model file in folder ``base``, into a spilled tensor: its
    bytes are copied file to file (``copy_file_range``: no copy passes through this process's memory)
    into a spill file that only this process uses, so nothing can change them while they are mapped."""
    location, offset, length = _external_info(t)
    if length < 0:
        length = _nbytes(t)
    path = _SPILL.get() / f"{next(_SPILL.counter)}.bin"
    with open(Path(base) / location, "rb") as src, open(path, "wb", buffering=0) as dst:
        left, at = length, offset
        while left > 0:
            try:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), at)
            except OSError:  # another filesystem or kernel without it: plain reads
                src.seek(at)
                chunk = src.read(min(left, COPY_CHUNK))
                n = dst.write(chunk) if chunk else 0
            if n <= 0:
                raise OSError(f"external data of tensor {t.name} ends before its {length} bytes")
            left -= n
            at += n
    del t.external_data[:]
    for key, v in (("location", str(path)), ("offset", "0"), ("length", str(length))):
        t.external_data.add(key=key, value=v)


def _write_array(value: np.ndarray, f: BinaryIO) -> None:
    """Write ``value``'s C-order bytes; a non-contiguous array is written a slab of rows at a time."""
    if value.flags.c_contiguous:
        value.tofile(f)
        return
    rows = max(1, COPY_CHUNK // max(1, value[0:1].nbytes))
    for start in range(0, value.shape[0], rows):
        np.ascontiguousarray(value[start:start + rows]).tofile(f)


def _external_info(t: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in t.external_data}
    return info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", -1))


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The values of an initializer: a read-only map of a spilled tensor's file, else ``to_array``."""
    if not spilled(t):
        return numpy_helper.to_array(t)
    location, offset, _ = _external_info(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))


def tensor_chunks(t: onnx.TensorProto, elements: int = 1 << 24) -> Iterator[np.ndarray]:
    """The flat values of an initializer, ``elements`` at a time; a spilled tensor is read from its file
    in chunks (a scan of it should not map, and so count as resident, the whole file)."""
    if not spilled(t):
        values = numpy_helper.to_array(t).reshape(-1)
        for start in range(0, values.size, elements):
            yield values[start:start + elements]
        return
    location, offset, _ = _external_info(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    total = int(np.prod(t.dims, dtype=np.int64))
    with open(location, "rb") as f:
        f.seek(offset)
        for start in range(0, total, elements):
            yield np.fromfile(f, dtype=dtype, count=min(elements, total - start))


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every spilled tensor's bytes loaded into the protobuf (``model`` itself if none is
    spilled), for code that reads initializers with onnx's own helpers."""
    if not has_spilled(model):
        return model
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    for t in model.graph.initializer:
        out.graph.initializer.add().CopyFrom(_inline(t) if spilled(t) else t)
    return out


def _inline(t: onnx.TensorProto) -> onnx.TensorProto:
    ref = onnx.TensorProto()
    _copy_fields(t, ref, skip=_DATA_FIELDS)
    location, offset, length = _external_info(t)
    with open(location, "rb") as f:
        f.seek(offset)
        ref.raw_data = f.read(length)
    return ref


def _copy_spilled(t: onnx.TensorProto, data: BinaryIO) -> int:
    location, offset, length = _external_info(t)
    with open(location, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"spill file {location} of tensor {t.name} is shorter than {length} bytes")
            data.write(chunk)
            left -= len(chunk)
    return length


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """The little-endian bytes of an initializer's values, as an external data file holds them."""
    if t.HasField("raw_data"):
        return t.raw_data
    values = numpy_helper.to_array(t)
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


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


def _linked(t: onnx.TensorProto, folder: Path) -> onnx.TensorProto:
    """A reference to ``t``'s spill file under a relative name in ``folder`` (hard link, or copy)."""
    location, offset, length = _external_info(t)
    name = f"spilled.{next(_SPILL.counter)}.bin"
    try:
        os.link(location, folder / name)
    except OSError:
        shutil.copyfile(location, folder / name)
    ref = onnx.TensorProto()
    _copy_fields(t, ref, skip=_DATA_FIELDS)
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", name), ("offset", str(offset)), ("length", str(length))):
        ref.external_data.add(key=key, value=value)
    return ref


def _nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


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
