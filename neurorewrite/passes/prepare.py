"""Preparing a model for a runtime: the named pass sequence ``ort_session`` and ``compile`` call once.

Replaces what a runtime cannot run, or runs slowly, with what it runs best; the file on disk is
never changed. The sequences, by runtime:

- ``onnxruntime``: ``fold tied children`` (:mod:`.fold_tied`), ``fold constant children``
  (:mod:`.fold_constant`), then ``sparse to standard ops`` (:mod:`.sparse_to_standard`, method
  ``densify`` or ``gather``);
- ``tvm``: ``fold tied children``, ``fold constant children`` (the TVM importer maps ``SparseLinear`` to
  the project's kernels).

A file ``expand`` wrote in the ``dense`` format (its FPE record says so) is first lowered to the
``sparse`` format (``dense FPE layers to sparse``, :mod:`.lower`): the folds then apply to it as to a
sparse file, and the runtime no longer multiplies the zeros of the widened layers.

Each step preserves the model's outputs (float summation order aside); a model without the project's
operators or a dense FPE record passes through unchanged (the same object, and an empty report). The
report says what each step changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.passes.fold_constant import fold_constant_children
from neurorewrite.passes.fold_tied import fold_tied_children
from neurorewrite.passes.lower import check_format, lower_model
from neurorewrite.passes.sparse_to_standard import METHODS, has_sparse_ops, to_standard_ops
from neurorewrite.rewriter.record import read_record

RUNTIMES = ("onnxruntime", "tvm")


@dataclass
class PrepareReport:
    """The steps that ran, in order, and what the folds did: ``folded``/``kept`` one row per SparseLinear
    the tied fold looked at, ``constant`` one row per second layer whose constant children were folded."""

    runtime: str
    steps: list[str] = field(default_factory=list)
    folded: list[dict[str, object]] = field(default_factory=list)
    kept: list[dict[str, object]] = field(default_factory=list)
    constant: list[dict[str, object]] = field(default_factory=list)
    sparse_method: str | None = None

    @property
    def modified(self) -> bool:
        return bool(self.steps)


Step = tuple[str, Callable[[onnx.ModelProto, PrepareReport], onnx.ModelProto]]


def _fold(model: onnx.ModelProto, report: PrepareReport) -> onnx.ModelProto:
    new, fold = fold_tied_children(model)
    report.folded, report.kept = fold.folded, fold.kept
    return new


def _fold_constant(model: onnx.ModelProto, report: PrepareReport) -> onnx.ModelProto:
    new, fold = fold_constant_children(model)
    report.constant = fold.folded
    return new


def _standard(method: str) -> Callable[[onnx.ModelProto, PrepareReport], onnx.ModelProto]:
    def run(model: onnx.ModelProto, report: PrepareReport) -> onnx.ModelProto:
        report.sparse_method = method
        return to_standard_ops(model, method)

    return run


def preparation_steps(runtime: str, sparse_method: str = "densify") -> list[Step]:
    """The named steps that prepare a model for ``runtime``."""
    if runtime not in RUNTIMES:
        raise InvalidOptionError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if sparse_method not in METHODS:
        raise InvalidOptionError(f"sparse method must be one of {', '.join(METHODS)}, got {sparse_method!r}")
    steps: list[Step] = [("fold tied children", _fold), ("fold constant children", _fold_constant)]
    if runtime == "onnxruntime":
        steps.append((f"sparse to standard ops ({sparse_method})", _standard(sparse_method)))
    return steps


def dense_fpe(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is an FPE expansion stored ``dense`` that the ``sparse`` format can hold."""
    record = read_record(model)
    if record is None or record.format != "dense" or record.alpha < 2 or not record.blocks:
        return False
    try:
        check_format("sparse", record.config.split)
    except InvalidOptionError:
        return False
    return True


def _to_sparse(model: onnx.ModelProto, report: PrepareReport) -> onnx.ModelProto:
    return lower_model(model, "sparse")[0]


def prepare_for_runtime(
    model: onnx.ModelProto, runtime: str, sparse_method: str = "densify"
) -> tuple[onnx.ModelProto, PrepareReport]:
    """``model`` ready for ``runtime``; see the module docstring. The input is not modified."""
    steps = preparation_steps(runtime, sparse_method)
    report = PrepareReport(runtime)
    if dense_fpe(model):
        steps.insert(0, ("dense FPE layers to sparse", _to_sparse))
    elif not has_sparse_ops(model):
        return model, report
    for name, step in steps:
        model = step(model, report)
        report.steps.append(name)
    return model, report
