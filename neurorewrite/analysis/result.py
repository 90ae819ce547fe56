"""The plain dataclasses ``analyze`` returns: numbers and numpy arrays, no onnx objects."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neurorewrite.analysis.activations import ActivationStats
from neurorewrite.analysis.matching import Matching
from neurorewrite.analysis.metrics import CosineStats, LayerStats
from neurorewrite.rewriter.blocks import Skipped
from neurorewrite.rewriter.record import FPERecord


@dataclass(frozen=True)
class GramPreview:
    """The cosine Gram of the first ``rows`` of ``of`` neuron rows of the first layer.

    Children of one parent are contiguous rows, so ``group`` (children per parent, 1 when dense) marks
    the parent blocks. Large layers are summarised by their first rows, never pooled: pooling a signed
    cosine would average the structure away.
    """

    matrix: np.ndarray
    rows: int
    of: int
    group: int

    @property
    def summarised(self) -> bool:
        return self.rows < self.of


@dataclass(frozen=True)
class SparsityPreview:
    """A layer's nonzero pattern pooled to tiles: each cell is the fraction of nonzeros in its tile."""

    layer: str
    shape: tuple[int, int]  # (out, in) of the weight
    pooled: np.ndarray
    tile: tuple[int, int]  # weights per tile (rows, columns); (1, 1) means the exact pattern


@dataclass
class BlockAnalysis:
    """Everything measured on one MLP block ``second(act(first(x)))`` (gated: ``second(act(first(x)) * up(x))``).

    For a gated block the capacity is measured over the gate and up rows together (both read the
    input features), the neuron cosines and the Gram preview over each neuron's gate and up weights
    side by side (``[Wg | Wu]``, one row per hidden unit).
    """

    name: str
    activation: str
    hidden_tensor: str
    in_features: int
    width: int
    out_features: int
    first: LayerStats
    second: LayerStats
    capacity: np.ndarray  # (in_features,), per input feature of the first layer
    cosine: CosineStats  # over the first layer's neuron rows
    gram: GramPreview
    sparsity: list[SparsityPreview] = field(default_factory=list)
    activations: ActivationStats | None = None
    form: str = "mlp"  # "mlp", "gated", "gated (fused gate/up)": see rewriter.blocks.MLPBlock.form
    up: LayerStats | None = None  # a gated block's up projection (gate: ``first``; fused: both in ``first``)

    @property
    def capacity_sum(self) -> float:
        return float(self.capacity.sum())


@dataclass
class ModelAnalysis:
    label: str  # the path given, or "model" / "other" for in-memory models
    blocks: list[BlockAnalysis]
    skipped: list[Skipped]
    fpe: FPERecord | None
    data_vectors: int | None = None  # activation vectors per block's sample (None without data)

    def block(self, name: str) -> BlockAnalysis:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"{self.label} has no MLP block named {name}")


@dataclass
class Analysis:
    """``analyze`` of one model, or of an original and its rewritten version with their blocks paired."""

    model: ModelAnalysis
    other: ModelAnalysis | None = None
    matching: Matching | None = None
