"""Small helpers for training under ``torch.distributed``: unwrapping, rank-wide sums, equal shards.

Everything here is a no-op (or the identity) when no process group is initialised, so the same
training code runs in one process and under ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neurorewrite.errors import DataError
from neurorewrite.models.memel_stats import distributed_active

__all__ = [
    "all_ranks_sum", "broadcast_tensor", "check_equal_counts", "distributed_active", "rank_and_world", "unwrap",
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
