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
The room's modules: ``split`` (header + data file), ``spill`` (spilled tensors), ``lock`` (the folder
lock), ``common`` (shared helpers). Their public names are re-exported here.
"""

from __future__ import annotations

from neurorewrite.external_data.common import COPY_CHUNK, weight_bytes
from neurorewrite.external_data.lock import folder_lock, fsync_folder
from neurorewrite.external_data.spill import (
    SPILL_PREFIX,
    has_spilled,
    make_tensor,
    materialize,
    spill_copy,
    spilled,
    tensor_array,
    tensor_chunks,
)
from neurorewrite.external_data.split import (
    ALIGN_BIG,
    ALIGN_SMALL,
    INLINE_LIMIT,
    locations,
    tensor_bytes,
    write_pair,
    write_proto,
    write_split,
)

__all__ = [
    "ALIGN_BIG", "ALIGN_SMALL", "COPY_CHUNK", "INLINE_LIMIT", "SPILL_PREFIX", "folder_lock", "fsync_folder",
    "has_spilled", "locations", "make_tensor", "materialize", "spill_copy", "spilled", "tensor_array",
    "tensor_bytes", "tensor_chunks", "weight_bytes", "write_pair", "write_proto", "write_split",
]
