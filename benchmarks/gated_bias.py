"""Gated blocks: which hidden-bias mode to default to (split b/alpha vs copy b), bare and calibrated.

    python -m benchmarks.gated_bias [--seeds 5] [--alpha 4] [--widths 16 32] [--split S] [--lead-share F]
                                    [--prune global|layer]

For every width and seed: train a gated MLP on digits, ``64 -> silu(Wg x + bg) * (Wu x + bu) (H) -> 10``
(SwiGLU with biases, as Llama's ``mlp_bias=True`` writes it), export it, expand it with ``--bias split``
and ``--bias copy`` (alpha 4), calibrate on 512 training rows (no labels), and measure in onnxruntime
the test accuracy and the logits' relative RMS error against the dense model. ``split`` gives each
child ``b/alpha`` for both gate and up, so a child's product carries ``1/alpha^2`` of the parent's bias
term; ``copy`` keeps it whole in every child. ``--split`` sets the calibrated expansions' split
(default: ``expand``'s default with a sample).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import neurorewrite
from benchmarks.machine import describe
from examples.digits import export, fit_full_batch, load_data
from neurorewrite.table import format_table


def train_gated(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int = 300):
    import torch
    from torch import nn

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(64, hidden), nn.Linear(64, hidden), nn.Linear(hidden, 10)

        def forward(self, v):
            return self.down(torch.nn.functional.silu(self.gate(v)) * self.up(v))

    torch.manual_seed(seed)
    return fit_full_batch(Gated(), x, y, epochs)


def logits(model, x: np.ndarray) -> np.ndarray:
    from neurorewrite.runtime.ort import ort_session

    session = ort_session(model, providers=["CPUExecutionProvider"], threads=1)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def measure(hidden: int, seed: int, alpha: int, tmp: Path, split: str | None = None,
            lead_share: float | None = None, prune: str | None = None) -> dict[str, tuple[float, float]]:
    x_train, x_test, y_train, y_test = load_data(seed)
    dense = export(train_gated(x_train, y_train, hidden, seed), tmp / "gated.onnx")
    ref = logits(dense, x_test)
    scale = float(np.sqrt(np.mean(ref**2)))
    out = {"dense": (float((ref.argmax(1) == y_test).mean()), 0.0)}
    for bias in ("split", "copy"):
        for cal in (False, True):
            model, _ = neurorewrite.expand(dense, alpha=alpha, seed=seed, bias=bias,
                                           calibrate={"x": x_train[:512]} if cal else None,
                                           split=split if cal else None, lead_share=lead_share if cal else None,
                                           prune=(prune or "global") if cal else "global")
            z = logits(model, x_test)
            out[f"{bias}{' + calibrate' if cal else ''}"] = (
                float((z.argmax(1) == y_test).mean()), float(np.sqrt(np.mean((z - ref) ** 2))) / scale)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--split", default=None, help="the calibrated expansions' --split (default: expand's)")
    parser.add_argument("--lead-share", type=float, default=None,
                        help="the calibrated expansions' --lead-share (default: expand's; 1/alpha: balanced tiers)")
    parser.add_argument("--prune", default=None, choices=("global", "layer"),
                        help="the calibrated expansions' --prune (default: expand's, global)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"machine: {describe()}")
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.widths:
            runs = [measure(hidden, s, args.alpha, Path(tmp), args.split, args.lead_share, args.prune)
                    for s in range(args.seeds)]
            for key in runs[0]:
                acc = np.array([r[key][0] for r in runs])
                err = np.array([r[key][1] for r in runs])
                rows.append((hidden, key, f"{acc.mean():.4f} ± {acc.std():.4f}", f"{err.mean():.3f} ± {err.std():.3f}"))
    print(format_table(("hidden", "model", "test accuracy", "logits rel. RMS error vs dense"), rows,
                       title=f"gated MLP on digits, alpha={args.alpha}, {args.seeds} seeds (mean ± std), onnxruntime; "
                       f"calibrated with --split {args.split or 'default'} "
                       f"--lead-share {args.lead_share or 'default'} --prune {args.prune or 'default'}"))
    print(f"total time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
