"""Structured FPE (``--structured``: blocks split by default, tied outgoing weights) against the paper's unstructured
FPE on the Boolean DNF task, with masked fine-tuning as the paper uses FPE.

Same setup, data and seeds as ``benchmarks/boolean.py`` (its generator, helpers and defaults): dense
trains E1 + E2 epochs; every FPE variant expands the dense net after E1 epochs (same nonzero count)
and fine-tunes with fixed masks for E2 epochs. The first three rows therefore repeat boolean.py's.
Structured rows use ``fpe_expand(..., structured=True)`` (split ``blocks``, the preset's default,
``shared``, or ``feature``, which clusters the inputs by the Gram matrix into one partition for all
neurons; the clauses' variables are placed at random, so contiguous blocks favour no clause); "shared split, untied" is
the same split with the paper's free outgoing copies (the ``grouped`` format without the tie), which
separates the cost of the shared split from the cost of the tie. The "no fine-tune" rows
measure the expansion right after E1 epochs, bare and calibrated (label-free least-squares refit of
the outgoing weights on the training inputs) through the ONNX path (``neurorewrite.expand``).

Run: ``.venv/bin/python -m benchmarks.structured_boolean`` (from the repository root); options as
``benchmarks.boolean``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.boolean import accuracy, parse, train, warm_start
from benchmarks.machine import describe
from neurorewrite.api import expand
from neurorewrite.models import export_onnx, fpe_expand
from neurorewrite.runtime.ort import ort_session
from neurorewrite.table import format_table

FINETUNED = {  # label -> fpe_expand options (alpha and seed added per run)
    "FPE random split (paper)": {"split": "random"},
    "FPE clause split (paper)": {"split": "groups"},
    "shared split, untied": {"split": "shared", "prune": "layer"},
    "structured, blocks split": {"structured": True},
    "structured, shared split": {"structured": True, "split": "shared"},
    "structured, feature split": {"structured": True, "split": "feature"},
}
BARE = {  # label -> neurorewrite.expand options, applied to the dense net after E1 epochs
    "FPE random split": {"split": "random"},
    "structured, blocks split": {"structured": True},
    "structured, shared split": {"structured": True, "split": "shared"},
}


def onnx_accuracy(model: object, x: np.ndarray, y: np.ndarray) -> float:
    session = ort_session(model, providers=["CPUExecutionProvider"], threads=1)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def no_finetune_rows(warm: nn.Module, alpha: int, seed: int, x_tr: torch.Tensor, x_te: torch.Tensor,
                     y_te: torch.Tensor, folder: Path) -> dict[str, float]:
    """The expansions of the E1-epoch net without training: bare and calibrated, in onnxruntime."""
    path = folder / f"warm{seed}.onnx"
    export_onnx(warm, path, x_tr[:2])
    out = {"dense after E1 (no FPE)": onnx_accuracy(path, x_te.numpy(), y_te.numpy())}
    for label, options in BARE.items():
        for mode, sample in (("bare", None), ("calibrated", {"x": x_tr.numpy()})):
            model, _ = expand(path, alpha=alpha, seed=seed, calibrate=sample, **options)
            out[f"{label}, {mode}"] = onnx_accuracy(model, x_te.numpy(), y_te.numpy())
    return out


def run_seed(args, seed: int, folder: Path) -> dict[str, float]:
    run = warm_start(args, seed)  # the same data, init and shuffling order as benchmarks.boolean
    formula, x_tr, x_te, y_te, data, warm, dense = run.formula, run.x_tr, run.x_te, run.y_te, run.data, run.warm, run.dense
    out = {f"dense, {args.e1 + args.e2} epochs": accuracy(dense, x_te, y_te)}
    for label, options in FINETUNED.items():
        extra = {"groups": formula.clause_groups()} if options.get("split") == "groups" else {}
        fpe = fpe_expand(warm, alpha=args.alpha, seed=seed, bias=args.bias, **options, **extra)
        train(fpe, data, args.e2, args.lr)
        out[f"{label} + {args.e2} ft"] = accuracy(fpe, x_te, y_te)
    out.update(no_finetune_rows(warm, args.alpha, seed, x_tr, x_te, y_te, folder))
    return out


def summarize(results: list[dict[str, float]], reference: str) -> list[tuple[str, ...]]:
    """Mean +- std, min..max, and the mean paired difference (same seed) against ``reference``."""
    rows = []
    ref = np.array([r[reference] for r in results]) * 100
    for label in results[0]:
        acc = np.array([r[label] for r in results]) * 100
        diff = acc - ref
        rows.append((label, f"{acc.mean():.1f} +- {acc.std():.1f}", f"{acc.min():.1f}..{acc.max():.1f}",
                     "-" if label == reference else f"{diff.mean():+.1f} ({diff.min():+.1f}..{diff.max():+.1f})"))
    return rows


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    args = parse(argv)
    print(describe())
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        results = [run_seed(args, seed, Path(folder)) for seed in seeds]
    elapsed = time.monotonic() - start
    settings = (f"n={args.n} clauses={args.clauses} k={args.k} hidden={args.hidden} alpha={args.alpha} "
                f"train={args.train} test={args.test} E1={args.e1} E2={args.e2} Adam lr={args.lr} "
                f"batch={args.batch or 'full'} bias={args.bias} seeds {args.first_seed}..{args.first_seed + args.seeds - 1}")
    reference = f"FPE random split (paper) + {args.e2} ft"
    print(format_table(("model (same nonzero count)", "test acc % mean +- std", "min..max", "vs FPE random + ft, paired"),
                       summarize(results, reference),
                       title=f"Boolean DNF, structured vs unstructured FPE, {args.seeds} seeds: {settings}"))
    print(f"total time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
