"""SENN under ``torch.distributed``: one scoring batch for all ranks, and one decision.

Each rank holds a shard of the training data. Growth must be decided identically everywhere (the
ranks' models must keep the same shapes for DistributedDataParallel), and should be the decision one
process holding all the data would take. Two steps give both:

1. :func:`gather_scoring_batch` draws the scoring batch from the union of the shards (rank 0's samples
   first, then rank 1's, ...) exactly as one process holding that union draws it (all of it, or
   ``randperm(N, generator)[:limit]`` with the model's generator, whose state is the same on every
   rank), and gathers only the drawn rows to every rank. So every rank scores the same samples, and
   the score (the K-FAC factors, the candidate bound) is that of the union, at the cost of at most
   ``limit`` rows of communication, whatever the shard sizes. Rank 0's draw is broadcast, so a rank
   whose generator went astray cannot make the ranks gather different rows.
2. :func:`agree_on_proposal` broadcasts rank 0's proposal (kind, layer, the new neuron's weights, its
   scores) to all ranks. With identical inputs every rank already computed it; the broadcast makes the
   decision identical by construction even where floating point differs between machines.

Without a process group, or with ``SENNConfig(sync_ranks=False)``, both are the single-process code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from neurorewrite.models.distributed import distributed_active
from neurorewrite.models.senn_grow import Proposal
from neurorewrite.models.senn_score import Candidate

__all__ = ["agree_on_proposal", "gather_scoring_batch"]

KINDS = ("width", "depth")


def gather_scoring_batch(
    x: Tensor, y: Tensor, limit: int, generator: torch.Generator, sync_ranks: bool = True
) -> tuple[Tensor, Tensor]:
    """The scoring batch of the union of every rank's ``(x, y)`` (see the module docstring); of this
    rank's own data alone without a process group or with ``sync_ranks=False``."""
    if not (sync_ranks and distributed_active()):
        if x.shape[0] > limit:
            keep = torch.randperm(x.shape[0], generator=generator)[:limit]
            return x[keep], y[keep]
        return x, y
    world = dist.get_world_size()
    counts_list = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts_list, torch.tensor([x.shape[0]], dtype=torch.int64))
    counts = torch.cat(counts_list)
    ends = counts.cumsum(0)
    total = int(ends[-1])
    keep = torch.randperm(total, generator=generator)[:limit] if total > limit else torch.arange(total)
    dist.broadcast(keep, src=0)  # every rank draws (generators stay in step); rank 0's draw counts
    owner = torch.bucketize(keep, ends, right=True)  # the rank holding each drawn sample
    rank = dist.get_rank()
    local = keep[owner == rank] - (ends[rank] - counts[rank])
    sizes = torch.bincount(owner, minlength=world)
    most = int(sizes.max())
    pieces = []
    for tensor in (x, y):
        padded = tensor.new_zeros((most, *tensor.shape[1:]))
        padded[: local.numel()] = tensor[local]
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        by_rank = torch.cat([part[: int(size)] for part, size in zip(gathered, sizes)])
        # by_rank holds each rank's draws in draw order, rank after rank; put them back in draw order.
        order = torch.argsort(owner, stable=True)
        in_draw_order = torch.empty_like(by_rank)
        in_draw_order[order] = by_rank
        pieces.append(in_draw_order)
    return pieces[0], pieces[1]


def agree_on_proposal(proposal: Proposal | None, input_width: list[int], sync_ranks: bool = True) -> Proposal | None:
    """Rank 0's ``proposal`` on every rank (``input_width[layer]`` is the new neuron's input width);
    ``proposal`` itself without a process group or with ``sync_ranks=False``."""
    if not (sync_ranks and distributed_active()):
        return proposal
    header = torch.zeros(8, dtype=torch.float64)
    if proposal is not None:
        header[:] = torch.tensor([1.0, KINDS.index(proposal.kind), proposal.layer, proposal.candidate.gain,
                                  proposal.eta, proposal.ratio, proposal.absolute, float(proposal.candidate.bias)],
                                 dtype=torch.float64)
    dist.broadcast(header, src=0)
    if header[0] == 0:
        return None
    kind, layer = KINDS[int(header[1])], int(header[2])
    weight = torch.zeros(input_width[layer], dtype=torch.float64)
    if proposal is not None and proposal.candidate.weight.numel() == weight.numel():
        weight.copy_(proposal.candidate.weight)
    dist.broadcast(weight, src=0)
    gain, eta, ratio, absolute, bias = header[3:].tolist()
    candidate = Candidate(weight=weight, bias=torch.tensor(bias, dtype=torch.float64), gain=gain)
    return Proposal(kind, layer, candidate, eta, ratio, absolute)
