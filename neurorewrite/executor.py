"""A small onnxruntime executor for the passes: run a standard-op model, read intermediate tensors.

Passes that need a model's values (``calibrate`` reads hidden activations, ``finetune`` checks its torch
copy against onnxruntime) run them here, on the CPU provider. It runs graphs as they are: it does not
prepare models for deployment (that is :mod:`neurorewrite.runtime`, which builds on this module), so
a model that still holds the project's own operators is refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from neurorewrite.errors import DataError, UnsupportedModelError, first_line
from neurorewrite.external_data import has_spilled, weight_bytes, write_proto, write_split
from neurorewrite.ops import DOMAIN

# above this many weight bytes a model goes to onnxruntime as a file with external data: protobuf
# cannot serialise 2 GiB, and the bytes of a big model would be one more copy of its weights
IN_MEMORY_LIMIT = 1 << 30

DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """onnxruntime options: ``threads`` intra-op threads (default: its own), quiet logging, and with
    ``spinning=False`` idle workers sleep at once instead of busy-waiting for the next run."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: an error becomes our one-line message, not a log line too
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def plain_session(model: onnx.ModelProto, threads: int | None = None, outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """A CPU session over ``model`` exactly as it is (standard operators only), with the named
    intermediate tensors ``outputs`` added as graph outputs."""
    own = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    if own:
        raise UnsupportedModelError(
            f"the model holds {DOMAIN} operator(s) {', '.join(own)}; run this step on the model before "
            "--format sparse lowering, or load it with neurorewrite.runtime.ort_session"
        )
    with session_source(model, outputs) as source:
        try:
            return ort.InferenceSession(source, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types: an opset, op or type it does not know
            raise UnsupportedModelError(f"onnxruntime cannot run the model: {first_line(e)}") from e


@contextlib.contextmanager
def session_source(model: onnx.ModelProto, outputs: Sequence[str] = ()) -> Iterator[bytes | str]:
    """What onnxruntime opens for ``model`` plus graph outputs ``outputs``: its bytes, or for a model
    over :data:`IN_MEMORY_LIMIT` (or holding spilled tensors, :mod:`neurorewrite.external_data`) the
    path of a header whose weights sit in a data file beside it (in a temporary folder, removed when
    the context ends; onnxruntime has read the weights by then). Neither copies the model's weights
    inside protobuf."""
    if weight_bytes(model) <= IN_MEMORY_LIMIT and not has_spilled(model):
        if not outputs:
            yield model.SerializeToString()
            return
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        _add_outputs(probe, outputs)
        yield probe.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="neurorewrite-session.") as tmp:
        with open(Path(tmp) / "model.onnx.data", "wb") as data:  # spilled tensors are linked, not copied
            header = write_split(model, data, "model.onnx.data", link_into=Path(tmp))
        _add_outputs(header, outputs)
        write_proto(header, Path(tmp) / "model.onnx")
        yield str(Path(tmp) / "model.onnx")


def _add_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> None:
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)


def match_inputs(session: ort.InferenceSession, sample: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Map sample arrays to the session's inputs by name (a lone array feeds a lone input)."""
    inputs = session.get_inputs()
    if len(inputs) == 1 and len(sample) == 1 and inputs[0].name not in sample:
        sample = {inputs[0].name: next(iter(sample.values()))}
    missing = [i.name for i in inputs if i.name not in sample]
    if missing:
        raise DataError(f"{where}: no array for model input(s) {', '.join(missing)} (has {', '.join(sample)})")
    feeds = {}
    for i in inputs:
        value = np.asarray(sample[i.name])
        dtype = DTYPES.get(i.type)
        if value.dtype.kind not in "biuf":
            raise DataError(f"{where}: the array for input {i.name} has dtype {value.dtype}; it must hold numbers")
        if dtype is not None and value.dtype != dtype:
            value = value.astype(dtype)
        shape = i.shape
        if len(shape) != value.ndim or any(isinstance(d, int) and d != v for d, v in zip(shape, value.shape)):
            raise DataError(f"{where}: input {i.name} expects shape {shape}, the sample has {list(value.shape)}")
        feeds[i.name] = value
    return feeds


class OutputProbe:
    """A session over ``model`` that returns the named intermediate tensors (added as graph outputs).

    Build it once and :meth:`run` it on each chunk of a sample: the model copy and the session cost
    far more than a small run.
    """

    def __init__(self, model: onnx.ModelProto, tensors: Sequence[str], threads: int | None = None) -> None:
        self.tensors = list(tensors)
        self.session = plain_session(model, threads, outputs=self.tensors)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.tensors, dict(feeds))
        except Exception as e:  # onnxruntime raises its own exception types for bad feeds
            raise DataError(f"onnxruntime could not run the model on the sample: {first_line(e)}") from e
        return dict(zip(self.tensors, values))


def run_with_outputs(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    tensors: Sequence[str],
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` once and return the named intermediate tensors (see :class:`OutputProbe`)."""
    return OutputProbe(model, tensors, threads).run(feeds)
