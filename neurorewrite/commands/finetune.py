"""``neurorewrite finetune``: train an (FPE-expanded) ONNX MLP with its masks fixed, write it back."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.progress import ProgressBar
from neurorewrite.sample import load_sample
from neurorewrite.table import format_table

if TYPE_CHECKING:  # the pass imports torch and onnxruntime; the command loads it only when it runs
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
    p.add_argument("--data", type=Path, required=True, metavar="TRAIN.npz", help="npz with arrays x (N, ...) and y (N,) labels or (N, O) targets")
    p.add_argument("-o", "--output", type=Path, help="output path (default: MODEL.tuned.onnx beside the input)")
    p.add_argument("--epochs", type=int, default=25, help="passes over the data (default 25)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
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
            f"(found {', '.join(sorted(arrays))})"
        )
    return arrays["x"], arrays["y"]


def _check_options(args: argparse.Namespace) -> None:
    if args.epochs < 0:
        raise InvalidOptionError(f"--epochs must be >= 0, got {args.epochs}")
    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        raise InvalidOptionError(f"--lr must be > 0, got {args.lr}")


def run(args: argparse.Namespace) -> int:
    from neurorewrite.api import default_output
    from neurorewrite.passes.finetune_onnx import FinetuneOptions, finetune_model
    from neurorewrite.rewriter.io import load_model, save_model

    _check_options(args)
    output = args.output or default_output(args.model, "tuned")
    if output.exists() and output.resolve() == args.model.resolve():
        raise InvalidOptionError(f"-o {output} is the input model; write the tuned model elsewhere")
    model = load_model(args.model)
    x, y = load_training_data(args.data)
    options = FinetuneOptions(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
        weight_decay=args.weight_decay, momentum=args.momentum, seed=args.seed,
    )
    new, report = finetune_model(model, x, y, options, progress=ProgressBar("finetune"), where=str(args.model))
    save_model(new, output)
    if args.json:
        print(json.dumps({"output": str(output), **report.to_dict()}, indent=2))
    else:
        print(render_report(report, output))
    return 0


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
