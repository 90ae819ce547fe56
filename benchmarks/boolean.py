"""The FPE paper's Boolean task: dense vs FPE (random split) vs FPE (clause split) on random DNF.

Per seed: a random DNF (n variables, c clauses of k literals, disjoint unless --shared-variables),
balanced train/test samples, a one-hidden-layer ReLU MLP. Dense trains E1 + E2 epochs. FPE trains the
same dense net for E1 epochs, expands it with ``fpe_expand`` (alpha children per neuron, same nonzero
count) and fine-tunes it with fixed masks for E2 epochs, same optimizer. The clause split feeds
``split="groups"`` the clause structure (``DNF.clause_groups``). Training is full-batch by default
(--batch 0), with the paper's 1000 + 1000 epochs. Prints test accuracy (mean and spread over seeds) and train
accuracy.

The defaults were chosen on seeds 0..9; the default run uses seeds 100.. (unseen formulas and data).

Run: ``.venv/bin/python -m benchmarks.boolean`` (from the repository root).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks.dnf import DNF, balanced_sample, random_dnf
from benchmarks.machine import describe
from neurorewrite.errors import NeurorewriteError
from neurorewrite.models import finetune, fpe_expand
from neurorewrite.table import format_table


class Shuffled:
    """Minibatches of (x, y), reshuffled every epoch from a seeded generator; ``batch <= 0`` or at least
    the data size gives the whole set as one batch (full-batch training)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        if self.batch <= 0 or self.batch >= len(self.x):
            yield self.x, self.y
            return
        order = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            yield self.x[idx], self.y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(model: nn.Module, data: Shuffled, epochs: int, lr: float) -> None:
    finetune(model, data, epochs=epochs, optimizer=torch.optim.Adam(model.parameters(), lr=lr))


@dataclass
class SeedRun:
    """One seed's formula, data and networks: ``warm`` after E1 dense epochs, ``dense`` after E1 + E2."""

    formula: DNF
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_te: torch.Tensor
    y_te: torch.Tensor
    data: Shuffled
    warm: nn.Module
    dense: nn.Module


def warm_start(args: argparse.Namespace, seed: int) -> SeedRun:
    """The data and the dense baseline of one seed; every Boolean benchmark row starts from here."""
    rng = np.random.default_rng(seed)
    formula = random_dnf(args.n, args.clauses, args.k, rng, disjoint=not args.shared_variables)
    x_tr, y_tr = (torch.from_numpy(a) for a in balanced_sample(formula, args.train, rng))
    x_te, y_te = (torch.from_numpy(a) for a in balanced_sample(formula, args.test, rng))
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(args.n, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 2))
    data = Shuffled(x_tr, y_tr, args.batch, seed)
    train(dense, data, args.e1, args.lr)
    warm = copy.deepcopy(dense)
    train(dense, data, args.e2, args.lr)
    return SeedRun(formula, x_tr, y_tr, x_te, y_te, data, warm, dense)


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, float]:
    run = warm_start(args, seed)
    formula, x_tr, y_tr, x_te, y_te, data, warm, dense = (
        run.formula, run.x_tr, run.y_tr, run.x_te, run.y_te, run.data, run.warm, run.dense)
    out = {"dense": accuracy(dense, x_te, y_te), "dense train": accuracy(dense, x_tr, y_tr)}
    splits = {"random": {"split": "random"}, "clause": {"split": "groups", "groups": formula.clause_groups()}}
    for name, options in splits.items():
        fpe = fpe_expand(warm, alpha=args.alpha, seed=seed, bias=args.bias, **options)
        train(fpe, data, args.e2, args.lr)
        out[name] = accuracy(fpe, x_te, y_te)
        out[f"{name} train"] = accuracy(fpe, x_tr, y_tr)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="variables")
    p.add_argument("--clauses", type=int, default=8)
    p.add_argument("--k", type=int, default=3, help="literals per clause")
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--alpha", type=int, default=2)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--e1", type=int, default=1000, help="dense epochs before FPE")
    p.add_argument("--e2", type=int, default=1000, help="epochs after FPE (dense gets e1 + e2)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=0, help="minibatch size; 0 = full batch")
    p.add_argument("--bias", choices=("split", "copy"), default="split", help="fpe_expand bias mode")
    p.add_argument("--shared-variables", action="store_true", help="clauses may share variables")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=100, help="seeds are first-seed .. first-seed+seeds-1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    args = parse(argv)
    print(describe())
    start = time.monotonic()
    try:
        results = [run_seed(args, seed) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    except NeurorewriteError as error:
        raise SystemExit(f"error: {error}") from None
    elapsed = time.monotonic() - start
    paper = {"dense": "78.7%", "random": "88.7%", "clause": "99.4%"}
    rows = []
    for name, label in (("dense", f"dense, {args.e1 + args.e2} epochs"), ("random", "FPE random split"), ("clause", "FPE clause split")):
        acc = np.array([r[name] for r in results]) * 100
        fit = np.array([r[f"{name} train"] for r in results]) * 100
        rows.append((label, f"{acc.mean():.1f}%", f"{acc.std():.1f}", f"{acc.min():.1f}..{acc.max():.1f}",
                     f"{fit.mean():.1f}%", paper[name]))
    batch = "full" if args.batch <= 0 or args.batch >= args.train else args.batch
    settings = (f"n={args.n} clauses={args.clauses} k={args.k} "
                f"{'shared' if args.shared_variables else 'disjoint'} variables hidden={args.hidden} "
                f"alpha={args.alpha} bias={args.bias} train={args.train} test={args.test} E1={args.e1} "
                f"E2={args.e2} Adam lr={args.lr} batch={batch} seeds {args.first_seed}..{args.first_seed + args.seeds - 1}")
    print(format_table(("model", "test acc (mean)", "std", "min..max", "train acc", "paper"), rows,
                       title=f"FPE Boolean task, {args.seeds} seeds: {settings}"))
    print("per seed (dense / random / clause):", "; ".join(
        f"{r['dense'] * 100:.1f} / {r['random'] * 100:.1f} / {r['clause'] * 100:.1f}" for r in results))
    print(f"total time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
