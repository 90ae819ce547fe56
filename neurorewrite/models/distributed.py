"""Small helpers for training under ``torch.distributed``: unwrapping, rank-wide sums, equal shards.

Everything here is a no-op (or the identity) when no process group is initialised, so the same
training code runs in one process and under ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neurorewrite.errors import DataError
from neurorewrite.models.memel_stats import distributed_active

__all__ = [
    "RankShards", "all_ranks_sum", "broadcast_tensor", "check_equal_counts", "distributed_active", "rank_and_world",
    "ranks_identical", "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``), so
    checkpoints name their keys the same with and without the wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not distributed_active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_ranks_sum(values: list[float]) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (one ``all_reduce``; the values themselves alone)."""
    if not distributed_active():
        return list(values)
    packed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()


def check_equal_counts(count: int, what: str) -> None:
    """Raise :class:`DataError` unless every rank holds the same ``count`` (of samples, batches, ...).

    DistributedDataParallel averages gradients over ranks and needs the same number of backward
    passes on each: with unequal shards it would hang or weight the ranks' samples unequally."""
    if not distributed_active():
        return
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64))
    found = [int(c) for c in counts]
    if len(set(found)) > 1:
        raise DataError(
            f"the ranks hold different numbers of {what} ({', '.join(map(str, found))} on ranks 0..{len(found) - 1});"
            " give every rank the same number (e.g. DistributedSampler(drop_last=True), or equal shards)"
        )


def broadcast_tensor(value: Tensor, source: int = 0) -> Tensor:
    """``value`` as rank ``source`` holds it, on every rank (in place; returned for convenience)."""
    if distributed_active():
        dist.broadcast(value, src=source)
    return value


def ranks_identical(module: nn.Module) -> bool:
    """True when every tensor of ``module``'s ``state_dict`` equals rank 0's exactly, on every rank
    (always True alone). A check for examples and tests; it sends the whole state once."""
    if not distributed_active():
        return True
    same = True
    for value in unwrap(module).state_dict().values():
        if isinstance(value, Tensor):
            reference = value.detach().clone()
            dist.broadcast(reference, src=0)
            same = same and torch.equal(reference, value.detach())
    flag = torch.tensor([0 if same else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag) == 0


class RankShards:
    """This rank's share of shuffled global batches of ``tensors`` (all with the same first dimension).

    Each pass (epoch) draws a new permutation from ``seed`` and the epoch number, the same on every
    rank, cuts it into global batches of ``global_batch`` samples (a last, shorter batch is dropped),
    and yields this rank's contiguous slice of each, ``global_batch // world`` samples. So every rank
    gets the same number of batches and samples, and one process (world 1) iterating the same object
    gets the global batches themselves: the comparison DDP's gradient average is exact against.
    """

    def __init__(self, tensors: tuple[Tensor, ...], global_batch: int, seed: int = 0) -> None:
        self.rank, self.world = rank_and_world()
        if global_batch % self.world:
            raise DataError(f"the global batch ({global_batch}) must split evenly over {self.world} ranks")
        self.tensors, self.global_batch, self.seed, self.epoch = tensors, global_batch, seed, 0

    def __len__(self) -> int:
        return self.tensors[0].shape[0] // self.global_batch

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.tensors[0].shape[0], generator=generator)
        share = self.global_batch // self.world
        for start in range(0, len(self) * self.global_batch, self.global_batch):
            rows = order[start + self.rank * share : start + (self.rank + 1) * share]
            yield tuple(tensor[rows] for tensor in self.tensors)
