"""The torch side stays importable without onnxruntime or TVM (ARCHITECTURE: models/ must not import them)."""

from __future__ import annotations

import subprocess
import sys


def test_models_import_neither_onnxruntime_nor_tvm():
    code = (
        "import sys\n"
        "from neurorewrite.models import MEmeL, SelfExpandingMLP, export_onnx, finetune, fpe_expand, insert_memel\n"
        "bad = [m for m in ('onnxruntime', 'tvm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
