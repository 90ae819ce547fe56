"""The torch training side: FPE masks and fine-tuning, export, MEmeL, SENN.

Nothing here imports onnxruntime or TVM. ``finetune`` the function shadows the module of the same name
once this package is imported; ``import neurorewrite.models.finetune`` still reaches the module.
"""

from __future__ import annotations

from neurorewrite.models.export import export_onnx
from neurorewrite.models.finetune import FinetuneResult, finetune
from neurorewrite.models.fpe import FPERecord, MaskedLinear, apply_masks, enforce_masks, fpe_expand
from neurorewrite.models.fpe_checkpoint import fpe_state_dict, load_fpe_state_dict
from neurorewrite.models.masked_training import masked_train, supervised_loss, teacher_loss
from neurorewrite.models.memel import MEmeL, find_memel, insert_memel, remove_memel
from neurorewrite.models.memel_checkpoint import load_memel_state_dict, memel_state_dict
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import FitState, fit

__all__ = [
    "FPERecord", "FinetuneResult", "FitState", "MEmeL", "MaskedLinear", "SENNConfig", "SelfExpandingMLP",
    "apply_masks", "enforce_masks", "export_onnx", "find_memel", "finetune", "fit", "fpe_expand", "fpe_state_dict",
    "insert_memel", "load_fpe_state_dict", "load_memel_state_dict", "masked_train", "memel_state_dict",
    "remove_memel", "supervised_loss", "teacher_loss",
]
