"""Superposition diagnostics of MLP blocks, before and after the FPE rewrite.

``analyze(model, other=None, data=None) -> Analysis`` measures every MLP block (widths, nonzeros,
density, feature capacity, neuron cosine similarity; with data: dead / always-on neurons and the
monosemantic scale) and pairs the blocks of an original model with its rewritten version.
:mod:`.summary` turns an Analysis into tables and JSON; :mod:`.html` into a self-contained report.
"""

from neurorewrite.analysis.core import analyze
from neurorewrite.analysis.result import Analysis, BlockAnalysis, ModelAnalysis

__all__ = ["Analysis", "BlockAnalysis", "ModelAnalysis", "analyze"]
