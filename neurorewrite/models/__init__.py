"""The torch training side: FPE masks and fine-tuning, export, MEmeL, SENN.

The FPE names are imported eagerly: the function ``finetune`` shares its name with the module
``neurorewrite.models.finetune``, and binding the function here, after the module is loaded, is what
keeps ``from neurorewrite.models import finetune`` the function. MEmeL and SENN names are imported
lazily, so a missing or broken sibling module does not break the others. Nothing here imports
onnxruntime or TVM.
"""

from __future__ import annotations

import importlib
from typing import Any

from neurorewrite.models.export import export_onnx
from neurorewrite.models.finetune import FinetuneResult, finetune
from neurorewrite.models.fpe import FPERecord, MaskedLinear, apply_masks, enforce_masks, fpe_expand

_EAGER = ["FPERecord", "FinetuneResult", "MaskedLinear", "apply_masks", "enforce_masks", "export_onnx", "finetune", "fpe_expand"]
_NAMES = {
    "MEmeL": "neurorewrite.models.memel",
    "insert_memel": "neurorewrite.models.memel",
    "remove_memel": "neurorewrite.models.memel",
    "SelfExpandingMLP": "neurorewrite.models.senn",
}

__all__ = sorted([*_EAGER, *_NAMES])


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'neurorewrite.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
