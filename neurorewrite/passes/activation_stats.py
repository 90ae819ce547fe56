"""Activation statistics of the original model's MLP blocks on a sample: the scores of activation-aware
pruning (``expand --prune-by activation``, ``docs/methods.md`` 1.3b).

For every block ``y = W2 act(W1 x + b1) + b2`` (a gated block: inputs and hidden units only, see below) the sample's rows (padding left out, held-out samples
left out) give ``rms(x_j)`` per input, ``rms(h_i)`` per hidden unit and ``rms(z_i)`` of its
pre-activation. The prune scores (:class:`~neurorewrite.fpe.PruneScales`) are then in output units:

- ``W2[o, i]``: ``|W2[o, i]| * rms(h_i)``, the size of the entry's term in ``y_o``;
- ``W1[i, j]``: ``|W1[i, j]| * rms(x_j) * gain_i * ||W2[:, i]||``, its term in ``z_i`` carried through
  the activation (``gain_i = rms(h_i) / rms(z_i)``, the unit's average slope) and out to ``y``.

So one threshold over both layers (``--prune global``) compares like with like, and the weights that
matter for real inputs survive. The count stays exact (the prune is the same exact-count prune).

A gated block's unit ``act(g_i) * u_i`` has no one slope, so its gate and up rows keep a factor of one;
``rms(x_j)`` and ``rms(h_i)`` still scale inputs and outgoing columns. A 1x1-Conv block is read along
its channel axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch

from neurorewrite.fpe import PruneScales
from neurorewrite.models.onnx_module import OnnxGraph
from neurorewrite.passes.sample_chunks import MASK_INPUT, chunk_sample_for
from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights


def _rms(sum_sq: np.ndarray, n: int) -> np.ndarray:
    return np.sqrt(sum_sq / max(n, 1))


def activation_scales(
    model: onnx.ModelProto, blocks: Sequence[MLPBlock], sample: Mapping[str, np.ndarray], where: str = "--calibrate",
    holdout: float = 0.2, chunk_rows: int = 4096, mask_input: str | None = MASK_INPUT,
) -> dict[str, PruneScales]:
    """Per block name, the prune scales measured on ``sample`` run through ``model`` (the original)."""
    tensors = {t for b in blocks for t in (b.first.data_input, b.first.output, b.hidden)}
    lifted = OnnxGraph(model, where, outputs=sorted(tensors))
    chunks = chunk_sample_for(lifted, lifted.inputs, sample, where, holdout, chunk_rows, mask_input)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    widths, axes = {}, {}
    for b in blocks:
        widths[b.first.data_input], widths[b.first.output], widths[b.hidden] = b.in_features, b.first.out_features, b.width
        axes[b.first.data_input] = axes[b.first.output] = axes[b.hidden] = b.first.feature_axis
    with torch.no_grad():
        for chunk in chunks.fit:
            env = lifted.run(chunk.feeds)
            for name in tensors:
                rows = chunk.rows(env[name], widths[name], axes[name]).double()
                sums[name] = sums.get(name, 0) + rows.pow(2).sum(0).numpy()
                counts[name] = counts.get(name, 0) + len(rows)
    index = GraphIndex.build(model.graph)
    out = {}
    for b in blocks:
        x_rms = _rms(sums[b.first.data_input], counts[b.first.data_input])
        z_rms = _rms(sums[b.first.output], counts[b.first.output])
        h_rms = _rms(sums[b.hidden], counts[b.hidden])
        if b.gated:  # act(gate) * up has no one slope per unit: inputs and hidden units scale, rows do not
            out[b.name] = PruneScales(x_rms, (), h_rms)
            continue
        w2, _ = read_weights(index, b.second)
        gain = np.divide(h_rms, z_rms, out=np.zeros_like(h_rms), where=z_rms > 0)
        out[b.name] = PruneScales(x_rms, (gain * np.linalg.norm(w2.astype(np.float64), axis=0),), h_rms)
    return out
