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

from neurorewrite.executor import session_options
from neurorewrite.ops import DOMAIN
from neurorewrite.passes.prepare import PrepareReport, prepare_for_runtime
from neurorewrite.rewriter.io import load_model


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
    source: bytes | str
    report = PrepareReport("onnxruntime")
    if isinstance(model, onnx.ModelProto):
        prepared, report = prepare_for_runtime(model, "onnxruntime", sparse_method)
        source = prepared.SerializeToString()
    elif _uses_own_operators(model):
        prepared, report = prepare_for_runtime(load_model(model), "onnxruntime", sparse_method)
        source = prepared.SerializeToString()
    else:
        source = str(model)
    session = ort.InferenceSession(source, sess_options=session_options(threads, spinning), providers=list(providers))
    session.neurorewrite_preparation = report
    return session


def _uses_own_operators(path: str | os.PathLike) -> bool:
    """Whether the file imports the project's domain (read without its weights)."""
    head = onnx.load(str(path), load_external_data=False)
    return any(o.domain == DOMAIN for o in head.opset_import)
