"""``analyze``: load one or two models, find and pair their MLP blocks, measure weights and activations.

The blocks are found by the same detection ``expand`` uses (:func:`find_blocks`, :func:`read_weights`).
With a sample, the data is matched against every model's inputs before anything heavy runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import onnx

from neurorewrite.analysis.activations import Feeds, check_data, hidden_statistics
from neurorewrite.analysis.matching import Matching, match_blocks
from neurorewrite.analysis.metrics import cosine_gram, feature_capacity, layer_stats, pooled_density, row_cosines
from neurorewrite.analysis.result import Analysis, BlockAnalysis, GramPreview, ModelAnalysis, SparsityPreview
from neurorewrite.passes.expand_blocks import no_blocks_error
from neurorewrite.rewriter.blocks import BlockSearch, MLPBlock, find_blocks
from neurorewrite.rewriter.record import read_record
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.io import ModelLike, load_model
from neurorewrite.rewriter.linear import Linear, read_weights
from neurorewrite.rewriter.stored import fpe_rows, tied_weights
from neurorewrite.sample import load_sample

GRAM_ROWS = 256  # most neuron rows a Gram preview shows
SPARSITY_SIDE = 256  # most cells a side of a pooled sparsity picture

Progress = Callable[[int, int, str], None]
Data = str | os.PathLike | Mapping[str, np.ndarray]


class _Loaded:
    """A model with its blocks found, its label and FPE record."""

    def __init__(self, source: ModelLike, default_label: str) -> None:
        self.label = default_label if isinstance(source, onnx.ModelProto) else str(source)
        self.proto = load_model(source, spill=True)  # big weights are read (mapped) block by block
        self.search: BlockSearch = find_blocks(self.proto)
        if not self.search.blocks:
            raise no_blocks_error(self.label, self.search.skipped)
        self.fpe = read_record(self.proto, self.label)
        self.feeds: Feeds | None = None


def analyze(
    model: ModelLike, other: ModelLike | None = None, data: Data | None = None, progress: Progress | None = None
) -> Analysis:
    """Superposition metrics of every MLP block of ``model`` (and of ``other``, paired block by block).

    ``data`` is an ``.npz`` path or a mapping from graph input names to arrays (first axis: rows); with
    it, hidden activations are measured too. Raises NoBlocksError, DataError or ModelLoadError.
    """
    first = _Loaded(model, "model")
    second = _Loaded(other, "other") if other is not None else None
    loaded = [m for m in (first, second) if m is not None]
    if data is not None:
        sample = load_sample(data, "--data")
        for m in loaded:
            m.feeds = check_data(m.proto, sample, f"--data for {m.label}")
    matching = None
    if second is not None:
        matching = match_blocks(first.search.blocks, second.search.blocks, first.fpe, second.fpe)
    rows, groups = _preview_plan(first, second, matching)
    steps = sum(len(m.search.blocks) + (1 if m.feeds else 0) for m in loaded)
    counter = _Counter(steps, progress)
    result = Analysis(_analyze_model(first, rows[0], groups[0], second is None, counter), matching=matching)
    if second is not None:
        result.other = _analyze_model(second, rows[1], groups[1], True, counter)
    counter.finish()
    return result


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def step(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, label)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total, "done")


def _preview_plan(
    first: _Loaded, second: _Loaded | None, matching: Matching | None
) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """Rows of each block's Gram preview and children per parent, per model.

    A paired block shows the same parents before and after: ``P`` parents and their ``alpha * P``
    children, with ``alpha * P <= GRAM_ROWS``.
    """
    rows: list[dict[str, int]] = [{}, {}]
    groups: list[dict[str, int]] = [{}, {}]
    for which, m in enumerate((first, second)):
        if m is None:
            continue
        records = set() if m.fpe is None else {r.name for r in m.fpe.blocks}
        alpha = 1 if m.fpe is None else m.fpe.alpha
        for b in m.search.blocks:
            rows[which][b.name] = min(b.width, GRAM_ROWS)
            groups[which][b.name] = alpha if b.name in records else 1
    if matching is not None and second is not None:
        widths = {b.name: b.width for b in first.search.blocks}
        for pair in matching.pairs:
            alpha = pair.alpha or 1
            parents = min(widths[pair.before], max(1, GRAM_ROWS // alpha))
            rows[0][pair.before] = parents
            rows[1][pair.after] = parents * alpha
            groups[1][pair.after] = alpha
    return rows, groups


def _analyze_model(
    m: _Loaded, rows: dict[str, int], groups: dict[str, int], sparsity: bool, counter: _Counter
) -> ModelAnalysis:
    index = GraphIndex.build(m.proto.graph)
    blocks = []
    for block in m.search.blocks:
        counter.step(f"{m.label}: {block.name}")
        blocks.append(_analyze_block(index, block, rows[block.name], groups[block.name], sparsity))
    out = ModelAnalysis(m.label, blocks, list(m.search.skipped), m.fpe)
    if m.feeds is not None:
        counter.step(f"{m.label}: activations")
        # a --structured block written one MatMul per child has no hidden tensor (its children are summed)
        measured = [b for b in m.search.blocks if b.hidden]
        axes = {b.hidden: b.second.feature_axis for b in measured}
        stats = hidden_statistics(m.proto, m.feeds, [b.hidden for b in measured], feature_axes=axes)
        for block, analysis in zip(m.search.blocks, blocks):
            analysis.activations = stats.get(block.hidden) if block.hidden else None
        out.data_vectors = next(iter(stats.values())).vectors if stats else 0
    return out


def _gate_and_up(index: GraphIndex, block: MLPBlock) -> tuple[np.ndarray, np.ndarray | None]:
    """The first layer's weights in the FPE layout (children of a parent contiguous), split into gate
    and up for a gated block (``None`` for up when the block is not gated)."""
    w = _fpe_layout(index, block.first)
    if block.split is not None:
        h = w.shape[0] // 2
        halves = (w[:h], w[h:]) if block.split.gate_half == 0 else (w[h:], w[:h])
        return halves[0], halves[1]
    if block.up is not None:
        return w, _fpe_layout(index, block.up)
    return w, None


def _fpe_layout(index: GraphIndex, lin: Linear) -> np.ndarray:
    w, _ = read_weights(index, lin)
    order = fpe_rows(index, lin)
    return w if order is None else w[order]


def _analyze_block(index: GraphIndex, block: MLPBlock, rows: int, group: int, sparsity: bool) -> BlockAnalysis:
    w1, b1 = read_weights(index, block.first)
    w2, b2 = read_weights(index, block.second)
    gate, up = _gate_and_up(index, block)
    # a gated neuron reads the input through its gate and its up row: measure both (docs/methods.md 1.8)
    columns = gate if up is None else np.vstack([gate, up])
    neurons = gate if up is None else np.hstack([gate, up])
    up_stats = None
    if block.up is not None:
        wu, bu = read_weights(index, block.up)
        up_stats = layer_stats(block.up.name, wu, bu)
    previews = []
    if sparsity:
        layers = [(block.first, w1)] + ([] if block.up is None else [(block.up, read_weights(index, block.up)[0])])
        for lin, w in layers + [(block.second, w2)]:
            pooled, tile = pooled_density(w, SPARSITY_SIDE)
            previews.append(SparsityPreview(lin.name, (int(w.shape[0]), int(w.shape[1])), pooled, tile))
    stored = tied_weights(index, block.second)  # a tied second layer counts what it stores
    w2s, b2s = stored if stored is not None else (w2, b2)
    return BlockAnalysis(
        name=block.name, activation=block.activation, hidden_tensor=block.hidden, in_features=block.in_features,
        width=block.width, out_features=block.out_features, first=layer_stats(block.first.name, w1, b1),
        second=layer_stats(block.second.name, w2s, b2s), capacity=feature_capacity(columns), cosine=row_cosines(neurons),
        gram=GramPreview(cosine_gram(neurons, rows), rows, block.width, group), sparsity=previews,
        form=block.form, up=up_stats,
    )
