"""What MEmeL costs per training step: plain step vs the same step with MEmeL, on two models.

1. ``mlp``: a 4-layer MLP, width 512, batch 256, MEmeL (top_t=1) after each of the three hidden ReLUs;
   cross entropy, SGD. Target: ratio <= 1.10.
2. ``transformer``: one ``nn.TransformerEncoderLayer`` (hidden 768, 12 heads, FFN 3072, GELU, dropout 0
   so that nothing cheap pads the plain step), sequence 128, batch 16, MEmeL (top_t=1) after the FFN
   activation (its statistics are per element of the 128 x 3072 activation); mean squared error to a
   fixed target, SGD. Target: ratio <= 1.05.

Each model runs plain, with MEmeL on its fused CPU kernel (the default path, see
``neurorewrite.models.memel_native``), and with MEmeL's eager torch code, on one torch thread, in
interleaved repeats (the order flips every repeat); MEmeL is past its warm-up, so every timed step
inhibits. Reported per clock (wall, and the thread's CPU time, which other processes on a shared
machine do not inflate): the median step time and the median over repeats of the per-repeat ratio to
the plain step. The machine, its load average before and after, and the kernel status are printed.

Run: ``.venv/bin/python -m benchmarks.memel_cost [--models mlp,transformer] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.machine import describe
from neurorewrite.models.memel import insert_memel
from neurorewrite.models.memel_fused import eager_only
from neurorewrite.models.memel_native import kernel_status


@dataclass(frozen=True)
class CostCase:
    """One model to time: how to build it (seeded), where MEmeL goes, its batch and loss, the target."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    after: list[str]
    inputs: tuple[torch.Tensor, torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: float
    repeats: int
    steps: int


def _mlp(width: int = 512, classes: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )


def _encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation=nn.GELU(), batch_first=True)


def cases() -> dict[str, CostCase]:
    generator = torch.Generator().manual_seed(0)
    mlp_inputs = (torch.randn(256, 512, generator=generator), torch.randint(0, 10, (256,), generator=generator))
    encoder_inputs = (torch.randn(16, 128, 768, generator=generator), torch.randn(16, 128, 768, generator=generator))
    return {
        "mlp": CostCase(
            "mlp", "4-layer MLP width 512, batch 256, MEmeL (top_t=1) after the 3 hidden ReLUs, cross entropy, SGD",
            _mlp, ["1", "3", "5"], mlp_inputs, nn.functional.cross_entropy, 1.10, 31, 5,
        ),
        "transformer": CostCase(
            "transformer", "TransformerEncoderLayer hidden 768, 12 heads, FFN 3072 (GELU, dropout 0), sequence 128,"
            " batch 16, MEmeL (top_t=1) after the FFN activation, MSE, SGD",
            _encoder_layer, ["activation"], encoder_inputs, nn.functional.mse_loss, 1.05, 9, 2,
        ),
    }


class _Variant:
    """A model, its optimizer and whether MEmeL runs eagerly; ``run`` times training steps."""

    def __init__(self, case: CostCase, memel: bool, eager: bool) -> None:
        self.model = case.build()
        if memel:
            insert_memel(self.model, after=case.after, top_t=1)
        self.eager = eager
        self.case = case
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.model.train()

    def run(self, steps: int) -> tuple[float, float]:
        """Seconds per step: (wall clock, CPU time of this thread)."""
        x, y = self.case.inputs
        with eager_only() if self.eager else contextlib.nullcontext():
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                loss = self.case.loss(self.model(x), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def cost_table(case: CostCase, repeats: int | None = None) -> dict[str, float]:
    """Time the case and print its table; returns the CPU-time ratio of each MEmeL variant."""
    repeats = repeats or case.repeats
    variants = {"plain": _Variant(case, False, False), "fused": _Variant(case, True, False),
                "eager": _Variant(case, True, True)}
    for variant in variants.values():  # past MEmeL's warm-up (n_forget=10), so every timed step inhibits
        variant.run(11 if case.steps < 5 else 12)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    order = list(variants)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            times[name].append(variants[name].run(case.steps))
    print(f"\n{case.name}: {case.title}; one torch thread, {repeats} interleaved repeats x {case.steps} steps;"
          " medians; ratio = median of per-repeat ratios to the plain step")
    print("| clock | plain step ms | MEmeL fused step ms | ratio | MEmeL eager step ms | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for column, clock in enumerate(("wall", "thread CPU time")):
        cells = []
        plain = [t[column] for t in times["plain"]]
        for name in ("fused", "eager"):
            mine = [t[column] for t in times[name]]
            ratio = statistics.median(m / p for m, p in zip(mine, plain))
            cells.append(f"{statistics.median(mine) * 1e3:.2f} | {ratio:.3f}")
            if column == 1:
                ratios[name] = ratio
        print(f"| {clock} | {statistics.median(plain) * 1e3:.2f} | {' | '.join(cells)} | <= {case.target:.2f} |",
              flush=True)
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated: mlp, transformer")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default per model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(describe())
    print(f"MEmeL on CPU float32: {kernel_status()}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    known = cases()
    for name in args.models.split(","):
        cost_table(known[name.strip()], args.repeats)
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
