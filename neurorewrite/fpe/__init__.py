"""The FPE math on numpy arrays: split neurons, copy outgoing columns, prune to the exact count.

This module is the one implementation of Fixed Parameter Expansion. The ONNX pass
(:mod:`neurorewrite.passes.expand_blocks`) and the torch side (:mod:`neurorewrite.models.fpe`) both call
:func:`expand_block`, so the same seed and options give the same expansion in both.

Notation follows ``docs/methods.md``: a block is ``h = act(W1 x + b1)``, ``y = W2 h + b2`` with
``W1`` of shape ``(H, D)`` and ``W2`` of shape ``(O, H)``. Expanding with ``alpha`` gives ``alpha * H``
children; child ``k`` of parent ``i`` is hidden unit ``i * alpha + k`` (children of one parent are
contiguous).

Rooms: ``config`` (options, the counting rule, per-block seeds), ``split`` (which child keeps each input
weight), ``prune`` (exact-count magnitude pruning), ``block`` (one block's expansion).

Counting rule: the nonzero count of a block is ``nnz(W1) + nnz(b1) + nnz(W2) + nnz(b2)``. Splitting
keeps ``nnz(W1)``; copying adds ``(alpha - 1) * (nnz(W2) + nnz(b1))`` (output columns and, for both
bias modes, hidden biases); pruning removes exactly that many weights, so the count after equals the
count before, ties included.
"""

from neurorewrite.fpe.config import (
    BIAS_MODES,
    DEFAULT_LEAD_SHARE,
    ONE_PARTITION_SPLITS,
    PRUNE_MODES,
    SPLITS,
    FPEConfig,
    block_nnz,
    block_seed,
    check_alpha,
    structured_split,
)
from neurorewrite.fpe.block import (
    BlockExpansion,
    GatedExpansion,
    copy_outputs,
    expand_bias,
    expand_block,
    expand_gated_block,
    join_fused,
    scatter_children,
    split_fused,
)
from neurorewrite.fpe.prune import PruneScales, choose_pruned, kth_weighted_value, smallest_by_count
from neurorewrite.fpe.split import (
    balanced_labels,
    check_groups,
    cluster_features,
    split_blocks,
    split_feature,
    split_groups,
    split_neurons,
    split_random,
    split_shared,
    split_tiered,
    tier_sizes,
)

__all__ = [
    "BIAS_MODES", "DEFAULT_LEAD_SHARE", "ONE_PARTITION_SPLITS", "PRUNE_MODES", "SPLITS", "BlockExpansion", "PruneScales", "FPEConfig", "GatedExpansion", "balanced_labels", "block_nnz",
    "block_seed", "check_alpha", "check_groups", "choose_pruned", "cluster_features", "copy_outputs",
    "expand_bias", "expand_block", "expand_gated_block", "join_fused", "kth_weighted_value", "scatter_children", "smallest_by_count",
    "split_blocks", "split_feature", "split_fused", "split_groups", "split_neurons", "split_random", "split_shared", "split_tiered", "tier_sizes",
    "structured_split",
]
