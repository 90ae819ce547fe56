"""onnxruntime sessions: providers, threads, and reading intermediate tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from neurorewrite.errors import DataError, first_line

_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def ort_session(
    model: onnx.ModelProto | str | os.PathLike,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    sparse_method: str = "densify",
    spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession on ``providers`` (default: CUDA first when present, then CPU).

    A model with ``ai.neurorewrite.SparseLinear`` nodes (``--format sparse``) is rewritten to standard
    ops first, by ``sparse_method`` (see :mod:`neurorewrite.runtime.sparse_ort`), after folding the
    children's tied outgoing copies (:mod:`neurorewrite.passes.fold_tied`). ``spinning=False`` stops
    the thread pool busy-waiting between runs (see :mod:`neurorewrite.runtime.bench`).
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:  # idle workers sleep at once instead of busy-waiting for the next run
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available_providers()]
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    source = _standard_ops(model, sparse_method) or source
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))


def _standard_ops(model: onnx.ModelProto | str | os.PathLike, method: str) -> bytes | None:
    """The serialized standard-op form of a model that uses the sparse operator, else None."""
    from neurorewrite.passes.fold_tied import fold_tied_children
    from neurorewrite.runtime.sparse_ort import DOMAIN, has_sparse_ops, to_standard_ops

    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        from neurorewrite.rewriter.io import load_model

        head = onnx.load(str(model), load_external_data=False)
        if not any(o.domain == DOMAIN for o in head.opset_import):
            return None
        proto = load_model(model)
    if not has_sparse_ops(proto):
        return None
    folded, _ = fold_tied_children(proto)
    return to_standard_ops(folded, method).SerializeToString()


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
        dtype = _DTYPES.get(i.type)
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
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        existing = {o.name for o in probe.graph.output}
        for name in tensors:
            if name not in existing:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        self.tensors = list(tensors)
        self.session = ort_session(probe, providers=["CPUExecutionProvider"], threads=threads)

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
