"""Running per-element statistics of MEmeL: batch moments, the cross-rank sum and the capped Chan merge.

The statistics of an activation are kept per element (over the batch dimension) as a sample count,
a mean and ``m2`` (the sum of squared deviations from the mean), the state of Chan et al.'s parallel
variance algorithm. Each training batch is merged in with :func:`merge_capped_`; before the merge the
old count is capped at ``(n_forget - 1)`` batches of the current size, so the merged statistics never
weigh more than ``n_forget`` batches and old batches fade like an exponential moving average with
rate ``1 / n_forget``. Capping keeps the old mean and the old per-sample spread ``m2 / count``: it
only says "these statistics are worth fewer samples now".

Counts are Python numbers and the tensors are updated in place: a handful of small kernels per step,
no host synchronisation except reading the summed count back after a cross-rank ``all_reduce``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_active() -> bool:
    """True when ``torch.distributed`` is usable and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def batch_moments(sum1: Tensor, sum2: Tensor, count: int, sync_ranks: bool) -> tuple[float, Tensor, Tensor]:
    """Return ``(count, mean_offset, m2)`` of a batch from its per-element sums around the running mean.

    ``sum1`` and ``sum2`` are the sums over the batch of ``z - mu`` and ``(z - mu)^2`` with ``mu`` the
    running mean (identical on every rank): sums around it do not cancel catastrophically.
    ``mean_offset`` is the batch mean minus ``mu``. With ``sync_ranks`` and an initialised process
    group, the count and both sums are added over all ranks in one ``all_reduce``, so every rank
    gets the moments of the global batch, exactly as one process on the whole batch would. The sums
    are reused in place.
    """
    total = float(count)
    if sync_ranks and distributed_active():
        packed = torch.cat([sum1.new_full((1,), total), sum1, sum2])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        total, sum1, sum2 = float(packed[0]), packed[1 : 1 + sum1.numel()], packed[1 + sum1.numel() :]
    mean_offset = sum1.div_(max(total, 1.0))
    m2 = sum2.addcmul_(mean_offset, mean_offset, value=-total).clamp_min_(0.0)  # sum2 - sum1^2 / count
    return total, mean_offset, m2


def merge_capped_(
    count: float, mean: Tensor, m2: Tensor, batch: tuple[float, Tensor, Tensor], n_forget: int
) -> float:
    """Merge batch moments ``(count, mean_offset, m2)`` into the running ``mean`` and ``m2`` in place.

    The running count is first capped at ``(n_forget - 1)`` times the batch count (``m2`` scaled with
    it), so the merged statistics weigh at most ``n_forget`` batches; ``n_forget = 1`` keeps only the
    new batch. Returns the merged count. Counts are Python numbers and the update is in place: each
    saved kernel launch or module ``__setattr__`` is a visible share of MEmeL's cost per step.
    """
    count_b, mean_offset, m2_b = batch
    if count_b == 0:  # an empty batch (e.g. the last shard of an uneven split) adds nothing
        return count
    capped = min(count, (n_forget - 1) * count_b)
    # Keep the per-sample spread m2/count of the old statistics while lowering their weight.
    keep = capped / count if count > 0 else 0.0
    total = capped + count_b
    mean.add_(mean_offset, alpha=count_b / total)
    m2.mul_(keep).add_(m2_b).addcmul_(mean_offset, mean_offset, value=capped * count_b / total)
    return total


def unbiased_variance(count: float, m2: Tensor) -> Tensor:
    """``m2 / (count - 1)``, the sample variance; ``m2`` itself where fewer than two samples were seen."""
    return m2 / max(count - 1.0, 1.0)
