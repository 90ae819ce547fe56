"""The torch training side: FPE masks and fine-tuning, export, MEmeL, SENN.

Nothing here imports onnxruntime or TVM. ``finetune`` the function shadows the module of the same name
once this package is imported; ``import neurorewrite.models.finetune`` still reaches the module.
"""

from __future__ import annotations

from neurorewrite.models.export import export_onnx
from neurorewrite.models.finetune import FinetuneResult, finetune
from neurorewrite.models.fpe import FPERecord, MaskedLinear, apply_masks, enforce_masks, fpe_expand
from neurorewrite.models.memel import MEmeL, find_memel, insert_memel, remove_memel
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import fit

__all__ = [
    "FPERecord", "FinetuneResult", "MEmeL", "MaskedLinear", "SENNConfig", "SelfExpandingMLP", "apply_masks",
    "enforce_masks", "export_onnx", "find_memel", "finetune", "fit", "fpe_expand", "insert_memel", "remove_memel",
]
