"""Training under torchrun: FPE fine-tuning, label-free distillation and SENN growth on several processes.

    torchrun --standalone --nproc-per-node 2 -m examples.distributed finetune
    torchrun --standalone --nproc-per-node 2 -m examples.distributed distill
    torchrun --standalone --nproc-per-node 2 -m examples.distributed senn
    python -m examples.distributed finetune          # the same in one process

Each rank trains on its share of every global batch (``RankShards``) under DistributedDataParallel
(gloo, on CPU); rank 0 prints the result and whether the ranks' weights are identical.
``--checkpoint FILE`` makes rank 0 save the trained model the way it is resumed (fpe_state_dict, or
the SENN state_dict), with the optimizer or fit state beside it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from examples.digits import load_data, train_mlp
from neurorewrite.models import MaskedLinear, finetune, fpe_expand
from neurorewrite.models.distributed import RankShards, distributed_active, rank_and_world, ranks_identical
from neurorewrite.models.fpe_checkpoint import fpe_state_dict
from neurorewrite.models.masked_training import masked_train, teacher_loss
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import fit


def _say(message: str) -> None:
    if rank_and_world()[0] == 0:
        print(message, flush=True)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    return DistributedDataParallel(model) if distributed_active() else model


def _masks_hold(model: torch.nn.Module) -> bool:
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    return bool(layers) and all(int(torch.count_nonzero(m.weight[~m.weight_mask])) == 0 for m in layers)


def _save(path: Path | None, payload: Callable[[], dict[str, Any]]) -> None:
    if path is not None and rank_and_world()[0] == 0:
        torch.save(payload(), path)
        print(f"checkpoint: {path}")


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    x_train, x_test, y_train, y_test = load_data(0)
    dense = train_mlp(x_train, y_train, hidden=32, seed=0)  # the same on every rank (seeded, CPU)
    as_tensors = (torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))
    return (*as_tensors, dense)  # type: ignore[return-value]


def run_finetune(args: argparse.Namespace) -> None:
    x_train, y_train, x_test, y_test, dense = _digits()
    model = fpe_expand(dense, alpha=4, seed=0)
    bare = _accuracy(model, x_test, y_test)
    wrapped = _data_parallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=3e-3)
    shards = RankShards((x_train, y_train), args.global_batch)
    result = finetune(wrapped, shards, epochs=args.epochs, optimizer=optimizer)
    tuned = _accuracy(model, x_test, y_test)
    same = ranks_identical(model)
    _say(f"FPE alpha 4 on digits 64-32-10, {rank_and_world()[1]} rank(s): test accuracy dense"
         f" {_accuracy(dense, x_test, y_test):.4f}, expanded {bare:.4f}, fine-tuned {tuned:.4f} (last epoch loss"
         f" {result.epoch_losses[-1]:.4f}); pruned weights zero: {_masks_hold(model)}; ranks identical: {same}")
    _save(args.checkpoint, lambda: {"fpe": fpe_state_dict(model), "optimizer": optimizer.state_dict()})


def run_distill(args: argparse.Namespace) -> None:
    x_train, _, x_test, y_test, dense = _digits()
    student = fpe_expand(dense, alpha=4, seed=0)
    bare = _accuracy(student, x_test, y_test)
    wrapped = _data_parallel(student)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=3e-3)
    inputs = RankShards((x_train,), args.global_batch)  # no labels: the teacher's outputs are the targets
    losses = masked_train(wrapped, inputs, teacher_loss(dense), epochs=args.epochs, optimizer=optimizer)
    with torch.no_grad():
        agree = float((student.eval()(x_test).argmax(1) == dense(x_test).argmax(1)).float().mean())
    same = ranks_identical(student)
    _say(f"distillation of digits 64-32-10 into FPE alpha 4, {rank_and_world()[1]} rank(s): test accuracy teacher"
         f" {_accuracy(dense, x_test, y_test):.4f}, expanded {bare:.4f},"
         f" distilled {_accuracy(student, x_test, y_test):.4f};"
         f" agrees with the teacher on {agree:.4f}; last epoch MSE {losses[-1]:.4g}; pruned weights zero:"
         f" {_masks_hold(student)}; ranks identical: {same}")
    _save(args.checkpoint, lambda: {"fpe": fpe_state_dict(student), "optimizer": optimizer.state_dict()})


def run_senn(args: argparse.Namespace) -> None:
    from sklearn.datasets import make_moons

    rank, world = rank_and_world()
    points, labels = make_moons(256, noise=0.1, random_state=0)
    x, y = torch.tensor(points, dtype=torch.float32), torch.tensor(labels)
    share = x.shape[0] // world  # each rank holds one shard; growth is scored on their union
    torch.manual_seed(0)
    net = SelfExpandingMLP(2, 2, [], loss="cross_entropy", config=SENNConfig(cooldown=5))
    state: dict[str, Any] = {}
    result = fit(net, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share], epochs=args.epochs,
                 batch_size=args.global_batch // world, lr=2e-2, on_epoch=lambda s: state.update(fit=s.to_dict()))
    same = ranks_identical(net)
    events = ", ".join(f"epoch {e.epoch} {e.kind} -> {list(e.widths)}" for e in result.events)
    _say(f"SENN on make_moons from no hidden layer, {world} rank(s): growth {events or 'none'}; last epoch loss"
         f" {result.losses[-1]:.4g}; ranks identical: {same}")
    _save(args.checkpoint, lambda: {"net": net.state_dict(), "fit": state["fit"]})


COMMANDS = {"finetune": run_finetune, "distill": run_distill, "senn": run_senn}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 (finetune, distill), 20 (senn)")
    parser.add_argument("--global-batch", type=int, default=32, help="samples per step over all ranks")
    parser.add_argument("--checkpoint", type=Path, help="rank 0 saves the trained model here")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20 if args.command == "senn" else 10
    torch.set_num_threads(1)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets them
    if launched:
        dist.init_process_group("gloo")  # the example trains on CPU
    try:
        COMMANDS[args.command](args)
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
