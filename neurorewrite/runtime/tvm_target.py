"""Parse ``--target``: ``llvm`` (this CPU), ``cuda``, or a TVM target JSON dict."""

from __future__ import annotations

import json
import os

import tvm

from neurorewrite.errors import InvalidOptionError

DEFAULT_CUDA_ARCH = "sm_80"


def host_llvm() -> dict[str, object]:
    """The llvm target for this machine: its CPU (so AVX-512 etc. are used) and its core count."""
    import tvm_ffi

    spec: dict[str, object] = {"kind": "llvm", "num-cores": max(1, os.cpu_count() or 1)}
    cpu = tvm_ffi.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    if cpu is not None and cpu() not in ("", "generic"):
        spec["mcpu"] = cpu()
    return spec


def parse_target(text: str | dict | tvm.target.Target) -> tvm.target.Target:
    """``llvm`` / ``cuda`` / a JSON dict -> a Target with the attributes tuning needs (num-cores, arch)."""
    if isinstance(text, tvm.target.Target):
        return text
    if isinstance(text, dict):
        spec = dict(text)
    elif text.strip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidOptionError(f"--target {text!r}: not valid JSON ({e})") from e
    elif text in ("llvm", "cpu"):
        spec = host_llvm()
    elif text in ("cuda", "gpu"):
        spec = {"kind": "cuda"}
    else:
        raise InvalidOptionError(f"--target {text!r} is unknown: use llvm, cuda, or a TVM target JSON dict")
    if spec.get("kind") == "llvm":
        spec.setdefault("num-cores", max(1, os.cpu_count() or 1))
    if spec.get("kind") == "cuda":
        spec.setdefault("arch", _cuda_arch())
        spec.setdefault("host", host_llvm())
    if spec.get("kind") not in ("llvm", "cuda"):
        raise InvalidOptionError(f"--target kind {spec.get('kind')!r} is not supported: use llvm or cuda")
    try:
        return tvm.target.Target(spec)
    except (ValueError, tvm.TVMError) as e:
        raise InvalidOptionError(f"--target {json.dumps(spec)} is not a valid TVM target: {e}") from e


def _cuda_arch() -> str:
    try:
        device = tvm.cuda(0)
        if device.exist:
            return "sm_" + device.compute_version.replace(".", "")
    except Exception:  # no CUDA driver: generate code for the default architecture
        pass
    return DEFAULT_CUDA_ARCH
