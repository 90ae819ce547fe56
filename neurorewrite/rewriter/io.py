"""Loading and saving ONNX models: typed errors for bad files, atomic writes, external data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from neurorewrite.errors import ModelLoadError, OutputError, VerificationError, first_line

# Protobuf cannot serialise a message over 2 GiB, and serialising one near that size costs several
# copies of it in memory; above this many weight bytes the weights go to a data file beside the model.
EXTERNAL_DATA_THRESHOLD = 1 << 30

ModelLike = onnx.ModelProto | str | os.PathLike


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers, from their shapes and types (serialising a large model to ask
    protobuf for its size would cost a copy of it, and fails above 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
        n = 1
        for d in t.dims:
            n *= d
        total += n * itemsize
    return total


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def stored_with_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file keeps its weights in external data files (read without loading them)."""
    return uses_external_data(onnx.load(str(path), load_external_data=False))


def load_model(source: ModelLike, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model (external data included) and run the ONNX checker on it.

    Raises ModelLoadError naming the file for a missing, non-ONNX, truncated or invalid model.
    An in-memory ModelProto is checked and returned as is (callers must not mutate it).
    """
    if isinstance(source, onnx.ModelProto):
        if check:
            _check(source, "<in-memory model>")
        return source
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        if uses_external_data(model):
            onnx.load_external_data_for_model(model, str(path.parent))
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(e)}); is the file complete?") from e
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found); is the file complete?")
    if check:
        _check(model, str(path), path if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD else None)
    return model


def _check(model: onnx.ModelProto, label: str, path: Path | None = None) -> None:
    try:
        onnx.checker.check_model(str(path) if path is not None else model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ModelLoadError(f"{label}: the ONNX checker rejects this model: {first_line(e)}") from e


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    With ``external_data`` (default: when the weights are too big for one protobuf) the weights go to
    ``<name>.data`` beside the model; both files are renamed into place only after both are complete.
    The model is verified with the full ONNX checker on disk before the rename, so an invalid model
    never replaces anything.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: folder {folder} is not writable")
    if external_data is None:
        external_data = uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as tmp:
        tmp_model = Path(tmp) / path.name
        try:
            if external_data:
                onnx.save_model(
                    model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024,
                )
                # onnx moved the weights out of the in-memory model; read them back so the caller's
                # model is as it was (cheaper than saving a copy of a multi-GB model)
                onnx.load_external_data_for_model(model, tmp)
            else:
                onnx.save_model(model, str(tmp_model))
        except (OSError, ValueError) as e:
            raise OutputError(f"{path}: could not write the model: {e}") from e
        try:
            onnx.checker.check_model(str(tmp_model), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise VerificationError(f"{path}: the written model fails the ONNX checker, nothing written: {first_line(e)}") from e
        if external_data and (Path(tmp) / data_name).exists():  # onnx writes none if every tensor is small
            os.replace(Path(tmp) / data_name, folder / data_name)
        os.replace(tmp_model, path)
    return path
