"""Deploying rewritten models: onnxruntime sessions, and the TVM path (``compile``, ``load``).

``compile`` and ``load`` are imported lazily, so importing this package does not import tvm.
"""

from typing import Any

from neurorewrite.runtime.ort import available_providers, ort_session

__all__ = ["available_providers", "compile", "load", "ort_session"]


def __getattr__(name: str) -> Any:
    if name == "compile":
        from neurorewrite.runtime.tvm_compile import compile

        return compile
    if name == "load":
        from neurorewrite.runtime.tvm_run import load

        return load
    raise AttributeError(f"module 'neurorewrite.runtime' has no attribute {name!r}")
