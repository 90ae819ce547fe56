"""Accuracy on digits: dense vs bare FPE vs FPE + label-free calibration (issue: calibrate).

    python -m benchmarks.calibrate [--seeds 5] [--alpha 4] [--widths 8 16 32] [--split S] [--prune-by P]
                                   [--lead-share F] [--prune global|layer]

For every hidden width and seed: train a dense 64-H-10 MLP, export it, expand it (alpha 4), calibrate it
on 512 training rows (no labels), and measure test accuracy of all three in onnxruntime. ``--split``,
``--prune-by``, ``--lead-share`` and ``--prune`` set the calibrated expansion's options (default:
``expand``'s defaults with a sample); the bare one always takes the defaults without a sample. Prints the table
and the share of the lost accuracy that calibration won back (mean over seeds; target >= 80%).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import neurorewrite
from benchmarks.machine import describe
from examples.digits import accuracy, export, load_data, recovered, train_mlp
from neurorewrite.table import format_table


def measure(hidden: int, seed: int, alpha: int, bias: str, tmp: Path, split: str | None = None,
            prune_by: str | None = None, lead_share: float | None = None,
            prune: str | None = None) -> tuple[float, float, float]:
    x_train, x_test, y_train, y_test = load_data(seed)
    dense = export(train_mlp(x_train, y_train, hidden, seed), tmp / "dense.onnx")
    sample = {"x": x_train[:512]}
    bare, _ = neurorewrite.expand(dense, alpha=alpha, seed=seed, bias=bias)
    cal, _ = neurorewrite.expand(dense, alpha=alpha, seed=seed, bias=bias, calibrate=sample, split=split,
                                 prune_by=prune_by, lead_share=lead_share, prune=prune or "global")
    return accuracy(dense, x_test, y_test), accuracy(bare, x_test, y_test), accuracy(cal, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--bias", nargs="+", default=["split", "copy"])
    parser.add_argument("--split", default=None, help="the calibrated expansion's --split (default: expand's)")
    parser.add_argument("--prune-by", default=None, help="the calibrated expansion's --prune-by (default: expand's)")
    parser.add_argument("--lead-share", type=float, default=None,
                        help="the calibrated expansion's --lead-share (default: expand's; 1/alpha: balanced tiers)")
    parser.add_argument("--prune", default=None, choices=("global", "layer"),
                        help="the calibrated expansion's --prune (default: expand's, global)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"machine: {describe()}")
    start = time.time()
    rows, shares_all = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for bias in args.bias:
            for hidden in args.widths:
                results = np.array([measure(hidden, s, args.alpha, bias, Path(tmp), args.split, args.prune_by,
                                            args.lead_share, args.prune) for s in range(args.seeds)])
                shares = [recovered(*r) for r in results]
                shares_all.setdefault(bias, []).extend(shares)
                mean, std = results.mean(axis=0), results.std(axis=0)
                rows.append((bias, hidden, *(f"{m:.4f} ± {s:.4f}" for m, s in zip(mean, std)),
                             f"{100 * np.mean(shares):.0f}% (min {100 * np.min(shares):.0f}%)"))
    print(format_table(("bias", "hidden", "dense", "fpe (bare)", "fpe + calibrate", "lost accuracy won back"), rows,
                       title=f"digits, alpha={args.alpha}, {args.seeds} seeds (mean ± std), onnxruntime; calibrated with "
                       f"--split {args.split or 'default'} --prune-by {args.prune_by or 'default'} "
                       f"--lead-share {args.lead_share or 'default'} --prune {args.prune or 'default'}"))
    for bias, shares in shares_all.items():
        print(f"bias={bias}: mean share won back over all widths and seeds: {100 * np.mean(shares):.1f}%")
    print(f"total time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
