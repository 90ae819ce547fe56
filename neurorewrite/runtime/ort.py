"""onnxruntime sessions for deployment: providers, threads, and the model prepared once.

:func:`ort_session` runs the preparation for onnxruntime (:mod:`neurorewrite.passes.prepare`: fold
tied children, then the project's operators to standard ops) on a model that needs it, and opens
the session on the result; the session's ``neurorewrite_preparation`` attribute is the report. A
model without the project's operators is opened as it is (from its path, when given one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx
import onnxruntime as ort

from neurorewrite.errors import NeurorewriteError, UnsupportedModelError, first_line
from neurorewrite.executor import session_options, session_source
from neurorewrite.external_data import folder_lock
from neurorewrite.ops import DOMAIN
from neurorewrite.passes.prepare import PrepareReport, dense_fpe, prepare_for_runtime
from neurorewrite.rewriter.io import load_model, read_header


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

    ``sparse_method`` picks how ``SparseLinear`` runs (see :mod:`neurorewrite.passes.sparse_to_standard`);
    ``spinning=False`` stops the thread pool busy-waiting between runs (see :mod:`neurorewrite.runtime.bench`).
    """
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available_providers()]
    report = PrepareReport("onnxruntime")
    options = session_options(threads, spinning)
    label = "the model" if isinstance(model, onnx.ModelProto) else os.fspath(model)
    try:
        if isinstance(model, onnx.ModelProto) or _needs_preparation(model):
            proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
            prepared, report = prepare_for_runtime(proto, "onnxruntime", sparse_method)
            with session_source(prepared) as source:  # a path with external data for a model over 1 GiB
                session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
        else:
            folder = os.path.dirname(os.fspath(model)) or "."
            with folder_lock(folder, shared=True):  # the model and its data file as one unit
                session = ort.InferenceSession(str(model), sess_options=options, providers=list(providers))
    except NeurorewriteError:
        raise
    except Exception as e:  # onnxruntime's own exception types: an opset, op or type it does not know
        raise UnsupportedModelError(f"{label}: onnxruntime cannot open the model ({first_line(e)})") from e
    session.neurorewrite_preparation = report
    return session


def _needs_preparation(path: str | os.PathLike) -> bool:
    """Whether the file imports the project's domain or is an FPE expansion stored dense (read without
    its external weights)."""
    header = read_header(path)
    return any(o.domain == DOMAIN for o in header.opset_import) or dense_fpe(header)
