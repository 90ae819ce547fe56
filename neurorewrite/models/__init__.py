"""The torch training side: FPE masks and fine-tuning, export, MEmeL, SENN.

Nothing here imports onnxruntime, TVM or ``neurorewrite.passes``.

Rooms: ``fpe`` (masked layers, ``fpe_expand``), ``trace_ops``/``module_blocks`` (a module's forward as an
op graph, and the MLP blocks on it), ``fpe_structured`` (the tied variant), ``masked_training``
(``finetune`` with fixed masks), ``export`` (to ONNX with the FPE record), ``onnx_module``/``onnx_ops``
(an ONNX graph lifted into torch), ``memel``/``memel_stats`` (MEmeL), ``senn*`` (SENN).
"""

from __future__ import annotations

from neurorewrite.models.export import export_onnx
from neurorewrite.models.fpe import MaskedLinear, apply_masks, enforce_masks, find_blocks_in_module, fpe_expand
from neurorewrite.models.fpe_checkpoint import fpe_state_dict, load_fpe_state_dict
from neurorewrite.models.masked_training import FinetuneResult, finetune, masked_train, supervised_loss, teacher_loss
from neurorewrite.models.memel import MEmeL, find_memel, insert_memel, remove_memel
from neurorewrite.models.memel_checkpoint import load_memel_state_dict, memel_state_dict
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import FitState, fit
from neurorewrite.rewriter.record import FPERecord

__all__ = [
    "FPERecord", "FinetuneResult", "FitState", "MEmeL", "MaskedLinear", "SENNConfig", "SelfExpandingMLP",
    "apply_masks", "enforce_masks", "export_onnx", "find_blocks_in_module", "find_memel", "finetune", "fit",
    "fpe_expand", "fpe_state_dict", "insert_memel", "load_fpe_state_dict", "load_memel_state_dict", "masked_train",
    "memel_state_dict", "remove_memel", "supervised_loss", "teacher_loss",
]
