"""``neurorewrite finetune``: train an (FPE-expanded) ONNX MLP with its masks fixed, write it back."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from neurorewrite.errors import DataError, InvalidOptionError, UnsupportedModelError, first_line
from neurorewrite.paths import check_no_overwrite, check_output_folder
from neurorewrite.progress import ProgressBar
from neurorewrite.sample import load_sample
from neurorewrite.table import format_table

if TYPE_CHECKING:  # the pass imports torch and onnxruntime; the command loads it only when it runs
    from neurorewrite.passes.distill_onnx import DistillReport
    from neurorewrite.passes.finetune_onnx import FinetuneReport

OPTIMIZERS = ("adam", "adamw", "sgd")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train an expanded model's weights with the FPE masks fixed (exact nonzero count kept)",
        description="Lift the MLP layers of an ONNX model into torch with their nonzero masks, train them on "
        "the arrays x (inputs) and y (targets) of an .npz file, and write the trained weights back. Integer y "
        "are class labels (cross-entropy on the model's first output); float y are targets (mean squared "
        "error). Pruned weights stay exactly zero; the FPE metadata is kept.",
    )
    p.add_argument("model", type=Path, help="input ONNX model (typically MODEL.fpe.onnx from neurorewrite expand)")
    p.add_argument("--data", type=Path, required=True, metavar="TRAIN.npz",
                   help="npz with arrays x (N, ...) and y (N,) labels or (N, O) targets; or, with --teacher, one "
                   "array per model input (no labels)")
    p.add_argument("--teacher", type=Path, metavar="ORIGINAL.onnx",
                   help="distil label-free: train the expanded layers so the outputs match this model's (the one "
                   "the input was expanded from) on the --data inputs; y labels in --data take precedence")
    p.add_argument("--holdout", type=float, default=0.2, metavar="SHARE",
                   help="with --teacher: share of the samples held out for early stopping and the report (default 0.2)")
    p.add_argument("--patience", type=int, default=2, help="with --teacher: epochs without held-out gain before stopping (default 2)")
    p.add_argument("--match", choices=("blocks", "outputs"), default="blocks",
                   help="with --teacher: match the outputs and the tensor each expanded block writes into (blocks, "
                   "default) or the outputs only")
    p.add_argument("-o", "--output", type=Path, help="output path (default: MODEL.tuned.onnx beside the input)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 25; 8 with --teacher)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; 1e-4 with --teacher)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 32; 16 with --teacher)")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="torch optimizer (default adam)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and torch (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(handler=run)


def load_training_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and ``y`` arrays of an ``.npz`` file, or a DataError saying what is there instead."""
    arrays = load_sample(path, "--data")
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"--data {path}: needs arrays x (inputs) and y (labels or targets); missing {', '.join(missing)} "
            f"(found {', '.join(sorted(arrays))}); to distil without labels, give --teacher ORIGINAL.onnx"
        )
    return arrays["x"], arrays["y"]


def _defaults(args: argparse.Namespace, distilling: bool) -> None:
    for name, labels, distil in (("epochs", 25, 8), ("lr", 1e-3, 1e-4), ("batch_size", 32, 16)):
        if getattr(args, name) is None:
            setattr(args, name, distil if distilling else labels)


def _check_options(args: argparse.Namespace) -> None:
    from neurorewrite.api import check_seed

    if args.epochs < 0:
        raise InvalidOptionError(f"--epochs must be >= 0, got {args.epochs}")
    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InvalidOptionError(f"--lr must be a finite number > 0, got {args.lr}")
    for option, value in (("--weight-decay", args.weight_decay), ("--momentum", args.momentum)):
        if not (math.isfinite(value) and value >= 0):
            raise InvalidOptionError(f"{option} must be a finite number >= 0, got {value}")
    check_seed(args.seed)


def check_trainable_io(model: onnx.ModelProto, where: str) -> None:
    """One data input with a free first (batch) axis, and at least one output: what training feeds."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not model.graph.output:
        raise UnsupportedModelError(f"{where}: the graph has no output to train")
    if len(inputs) != 1:
        raise UnsupportedModelError(f"{where}: fine-tuning needs exactly one graph input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value"):
        raise UnsupportedModelError(
            f"{where}: input {inputs[0].name} has a fixed batch size {dims[0].dim_value}; fine-tuning feeds batches of "
            "--batch-size rows: export the model with a dynamic first axis (e.g. torch.onnx.export(dynamic_axes=...))")


def finetune_io(model: Path, data: Path, output: Path, teacher: Path | None = None) -> None:
    """The collision rule for finetune: the output (and the data it replaces) is none of the inputs."""
    from neurorewrite.rewriter.io import model_files, replaced_files

    inputs = [*model_files(model), ("--data", data)]
    if teacher is not None:
        inputs += model_files(teacher, "--teacher")
    check_no_overwrite(inputs, replaced_files(output))
    check_output_folder(output, "-o")


def run(args: argparse.Namespace) -> int:
    from neurorewrite.api import check_no_new_nonfinite, default_output
    from neurorewrite.passes.finetune_onnx import FinetuneOptions, finetune_model
    from neurorewrite.rewriter.io import load_model, nonfinite_message, save_model, warn_nonfinite

    output = args.output or default_output(args.model, "tuned")
    finetune_io(args.model, args.data, output, args.teacher)
    arrays = load_sample(args.data, "--data")
    distilling = args.teacher is not None and not {"x", "y"} <= set(arrays)
    _defaults(args, distilling)
    _check_options(args)
    if distilling:
        return _distil(args, arrays, output)
    x, y = load_training_data(args.data)
    # the torch lift needs consistent shapes; big weights stay in files until the lift reads them
    model = load_model(args.model, warn=False, full_check=True, spill=True)
    check_trainable_io(model, str(args.model))
    bad = warn_nonfinite(model, str(args.model))
    if bad:
        raise UnsupportedModelError(nonfinite_message(str(args.model), bad).replace(
            "outputs that depend on it are not finite", "training would spread it to every weight; repair the model first"))
    options = FinetuneOptions(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
        weight_decay=args.weight_decay, momentum=args.momentum, seed=args.seed,
    )
    try:
        new, report = finetune_model(model, x, y, options, progress=ProgressBar("finetune"), where=str(args.model))
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        # torch's optimizers refuse a step that overflows float32: the options, not the model, are at fault
        raise InvalidOptionError(f"training overflowed float32 with --lr {args.lr} --weight-decay {args.weight_decay} "
                                 f"--momentum {args.momentum} ({first_line(e)}); use a smaller learning rate") from e
    check_no_new_nonfinite(new, False, "finetune")
    save_model(new, output)
    if args.json:
        print(json.dumps({"output": str(output), **report.to_dict()}, indent=2))
    else:
        print(render_report(report, output))
    return 0


def _distil(args: argparse.Namespace, arrays: dict[str, np.ndarray], output: Path) -> int:
    from neurorewrite.passes.distill_onnx import DistillOptions, distill_model
    from neurorewrite.rewriter.io import load_model, save_model

    options = DistillOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, holdout=args.holdout,
                             patience=args.patience, match=args.match, optimizer=args.optimizer,
                             weight_decay=args.weight_decay, seed=args.seed)
    student = load_model(args.model, warn=False, full_check=True, spill=True)
    teacher = load_model(args.teacher, warn=False, full_check=True, spill=True)
    new, report = distill_model(student, teacher, arrays, options, ProgressBar("distil"), where=f"--data {args.data}")
    save_model(new, output)
    if args.json:
        print(json.dumps({"output": str(output), **report.to_dict()}, indent=2, default=str))
    else:
        print(render_distill(report, output))
    return 0


def render_distill(report: DistillReport, output: Path) -> str:
    def cos(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    o = report.options
    ran = len(report.history)
    summary = format_table(
        ("held-out samples", "before", "after"),
        [("distance to the teacher (relative squared error)", f"{report.held_out_before:.4g}", f"{report.held_out_after:.4g}"),
         ("mean cosine of the first output to the teacher's", cos(report.cosine_before), cos(report.cosine_after))],
        title=f"distil: {report.samples} samples ({report.holdout_samples} held out), {ran} of {o.epochs} epochs"
        f"{' (stopped early)' if report.stopped_early else ''}, best epoch {report.best_epoch}, {o.optimizer} "
        f"lr={o.lr} batch={o.batch_size}, matched {len(report.matched)} tensor(s)",
    )
    layers = format_table(
        ("layer", "shape (out, in)", "nonzeros"),
        [(layer.name, f"{layer.shape[0]} x {layer.shape[1]}", f"{layer.nnz_before} -> {layer.nnz_after}") for layer in report.layers],
        title="\ntrained layers (masks fixed)",
    )
    return f"{summary}\n{layers}\n\nwrote {output}"


def render_report(report: FinetuneReport, output: Path) -> str:
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    o = report.options
    summary = format_table(
        ("", "before", "after"),
        [(f"train loss ({report.loss})", f"{report.loss_before:.4g}", f"{report.loss_after:.4g}"),
         ("train accuracy", acc(report.accuracy_before), acc(report.accuracy_after))],
        title=f"finetune: {report.samples} samples, {o.epochs} epochs, {o.optimizer} lr={o.lr} batch={o.batch_size}",
    )
    layers = format_table(
        ("layer", "shape (out, in)", "nonzeros"),
        [(layer.name, f"{layer.shape[0]} x {layer.shape[1]}", f"{layer.nnz_before} -> {layer.nnz_after}") for layer in report.layers],
        title="\nlayers (masks fixed)",
    )
    return f"{summary}\n{layers}\n\nwrote {output}"
