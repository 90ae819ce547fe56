"""Deploying rewritten models: onnxruntime sessions (and, where built, the TVM path)."""

from neurorewrite.runtime.ort import available_providers, ort_session

__all__ = ["available_providers", "ort_session"]
