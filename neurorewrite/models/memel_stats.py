"""Running per-element statistics of MEmeL: batch moments, the cross-rank sum and the capped Chan merge.

The statistics of an activation are kept per element (over the batch dimension) as a sample count,
a mean and ``m2`` (the sum of squared deviations from the mean), the state of Chan et al.'s parallel
variance algorithm. Each training batch is merged in with :func:`merge_capped`; before the merge the
old count is capped at ``(n_forget - 1)`` batches of the current size, so the merged statistics never
weigh more than ``n_forget`` batches and old batches fade like an exponential moving average with
rate ``1 / n_forget``. Capping keeps the old mean and the old per-sample spread ``m2 / count``: it
only says "these statistics are worth fewer samples now".

Everything here is tensor arithmetic without host synchronisation, so it costs a handful of
element-wise kernels per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_active() -> bool:
    """True when ``torch.distributed`` is usable and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def batch_moments(z2d: Tensor, shift: Tensor, sync_ranks: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(count, mean, m2)`` of ``z2d`` (samples x elements) over its first dimension.

    Sums are taken around ``shift`` (the running mean, identical on every rank) so that the
    sum of squares does not cancel catastrophically. With ``sync_ranks`` and an initialised
    process group, the count and both sums are added over all ranks in one ``all_reduce``, so every
    rank gets the moments of the global batch, exactly as one process on the whole batch would.
    """
    centred = z2d - shift
    sum1 = centred.sum(dim=0)
    sum2 = centred.square().sum(dim=0)
    count = torch.full((1,), float(z2d.shape[0]), dtype=sum1.dtype, device=sum1.device)
    if sync_ranks and distributed_active():
        packed = torch.cat([count, sum1, sum2])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        count, sum1, sum2 = packed[:1], packed[1 : 1 + sum1.numel()], packed[1 + sum1.numel() :]
    count = count.reshape(())
    mean_centred = sum1 / count
    m2 = (sum2 - sum1 * mean_centred).clamp_min(0.0)
    return count, shift + mean_centred, m2


def merge_capped(
    old: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], n_forget: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge batch moments ``new`` into running moments ``old``, each ``(count, mean, m2)``.

    The old count is first capped at ``(n_forget - 1) * count_new`` (``m2`` scaled with it), so
    the merged count is at most ``n_forget`` batches. ``n_forget = 1`` keeps only the new batch.
    """
    count_a, mean_a, m2_a = old
    count_b, mean_b, m2_b = new
    cap = count_b * (n_forget - 1)
    capped = torch.minimum(count_a, cap)
    # Keep the per-sample spread m2/count of the old statistics while lowering their weight.
    m2_a = torch.where(count_a > 0, m2_a * (capped / count_a.clamp_min(1.0)), torch.zeros_like(m2_a))
    total = capped + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / total)
    m2 = m2_a + m2_b + delta.square() * (capped * count_b / total)
    return total, mean, m2


def unbiased_variance(count: Tensor, m2: Tensor) -> Tensor:
    """``m2 / (count - 1)``, the sample variance; 0 where fewer than two samples were seen."""
    return m2 / (count - 1.0).clamp_min(1.0)
