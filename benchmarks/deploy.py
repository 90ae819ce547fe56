"""Deploy benchmark: original vs widened (alpha 4) models, side by side, interleaved.

Models: an FFN block 768 -> 3072 -> 768 (GELU) and a 2-layer torch TransformerEncoder (d_model 256,
FFN 1024, sequence 16; exported with dynamo=True). Variants, one function each: the original; the FPE
expansion as ``dense`` (zeros stored), ``grouped`` (shared split), ``structured`` (``--structured``:
blocks split, tied outgoing weights, one MatMul per child), ``sparse`` (CSR SparseLinear) through
both standard-op conversions, all in onnxruntime; and ``tvm``: the ``sparse`` file compiled by
``neurorewrite compile`` with ``--tvm-trials`` MetaSchedule trials per batch.
Prints the machine, then median latency and ratios against the original at batch 1 and 32, and each
written model's bytes. Thread pools do not spin (see :mod:`neurorewrite.runtime.bench`).

Run: ``.venv/bin/python -m benchmarks.deploy [--repeats N] [--threads T] [--tvm-trials N] [--variants ...]``
from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.machine import describe
from neurorewrite.api import expand
from neurorewrite.runtime.bench import bench_sessions, file_bytes
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS
from neurorewrite.table import format_table

ALPHA = 4
Variant = Callable[[Path, Path, argparse.Namespace], ort.InferenceSession | None]  # (original, folder, options)


def export_ffn(folder: Path, activation: type[torch.nn.Module] = torch.nn.GELU) -> Path:
    """``ffn.onnx``: Linear 768 -> 3072, ``activation``, Linear 3072 -> 768 (torch's init, seed 0), batch symbolic."""
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(768, 3072), activation(), torch.nn.Linear(3072, 768)).eval()
    return _export(ffn, torch.randn(2, 768), folder / "ffn.onnx")


def export_encoder(folder: Path) -> Path:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():  # the layers start as clones; identical weights would be exported as shared
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return _export(enc, torch.randn(2, 16, 256), folder / "encoder.onnx")


def _export(module: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """Export with input ``x`` whose dimension 0 is the symbolic ``batch``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], dynamic_shapes=({0: batch},))
    return path


def _session(path: Path, threads: int, method: str = "densify", spinning: bool = False) -> ort.InferenceSession:
    return ort_session(path, providers=["CPUExecutionProvider"], threads=threads, sparse_method=method, spinning=spinning)


def _written_path(original: Path, folder: Path, name: str) -> Path:
    return folder / f"{original.stem}.{name}.onnx"


def _written(original: Path, folder: Path, name: str, **options: object) -> Path:
    """The widened file ``name`` of ``original``, expanded with ``options`` on first use."""
    out = _written_path(original, folder, name)
    if not out.exists():
        expand(original, alpha=ALPHA, output=out, **options)
    return out


def original_variant(original: Path, folder: Path, args: argparse.Namespace) -> ort.InferenceSession:
    return _session(original, args.threads, spinning=args.spinning)


def dense_variant(original: Path, folder: Path, args: argparse.Namespace) -> ort.InferenceSession:
    return _session(_written(original, folder, "dense", split="random"), args.threads, spinning=args.spinning)


def grouped_variant(original: Path, folder: Path, args: argparse.Namespace) -> ort.InferenceSession:
    return _session(_written(original, folder, "grouped", split="shared", format="grouped"), args.threads, spinning=args.spinning)


def structured_variant(original: Path, folder: Path, args: argparse.Namespace) -> ort.InferenceSession:
    return _session(_written(original, folder, "structured", structured=True), args.threads, spinning=args.spinning)


def sparse_densify_variant(original: Path, folder: Path, args: argparse.Namespace) -> ort.InferenceSession:
    return _session(_written(original, folder, "sparse", split="random", format="sparse"), args.threads, "densify", args.spinning)


def sparse_gather_variant(original: Path, folder: Path, args: argparse.Namespace) -> ort.InferenceSession:
    return _session(_written(original, folder, "sparse", split="random", format="sparse"), args.threads, "gather", args.spinning)


def tvm_variant(original: Path, folder: Path, args: argparse.Namespace):  # noqa: ANN201 (a TvmSession, duck-typed)
    """The ``sparse`` file compiled by neurorewrite's TVM path, one library per batch, tuned with
    ``--tvm-trials`` MetaSchedule trials per batch (0: default schedules)."""
    from neurorewrite.runtime.tvm_session import tvm_session

    sparse = _written(original, folder, "sparse", split="random", format="sparse")
    return tvm_session(sparse, (1, 32), args.threads, folder, tune=args.tvm_trials > 0, trials=args.tvm_trials,
                       spinning=args.spinning)


VARIANTS: dict[str, tuple[Variant, str | None]] = {  # label -> (builder, written file's name)
    "original": (original_variant, None),
    "dense": (dense_variant, "dense"),
    "grouped": (grouped_variant, "grouped"),
    "structured": (structured_variant, "structured"),
    "sparse (densify)": (sparse_densify_variant, "sparse"),
    "sparse (gather)": (sparse_gather_variant, "sparse"),
    "tvm": (tvm_variant, None),
}


def bench_model(original: Path, folder: Path, args: argparse.Namespace) -> list[tuple[str, ...]]:
    variants = {label: v for label, v in VARIANTS.items() if label == "original" or label in args.variants}
    sessions = {}
    for label, (build, _) in variants.items():
        session = build(original, folder, args)
        if session is not None:
            sessions[label] = session
    # spinning pools need a few runs of their own before the timed ones count: bursts of 5
    result = bench_sessions(sessions, (1, 32), repeats=args.repeats, burst=5 if args.spinning else 1)
    base_bytes = file_bytes(original)
    rows = []
    for label, (_, written) in variants.items():
        path = original if label == "original" else _written_path(original, folder, written) if written else None
        size = f"{file_bytes(path) / base_bytes:.2f}x" if path is not None and path.exists() else "-"
        if label not in result.labels:
            rows.append((original.stem, label, size, "-", "-", "-", "-"))
            continue
        rows.append((
            original.stem, label, size,
            f"{result.median[(label, 1)] * 1e6:.0f}", f"{result.ratio(label, 1):.2f}x",
            f"{result.median[(label, 32)] * 1e6:.0f}", f"{result.ratio(label, 32):.2f}x",
        ))
    return rows


def check_outputs(original: Path, folder: Path, threads: int) -> str:
    """Max relative difference of every lowered format against the ``dense`` file on one input."""
    dense = _session(_written_path(original, folder, "dense"), threads)
    x = np.random.default_rng(0).standard_normal([2] + [d for d in dense.get_inputs()[0].shape[1:]]).astype(np.float32)
    ref = _session(_written_path(original, folder, "sparse"), threads).run(None, {"x": x})[0]
    want = dense.run(None, {"x": x})[0]
    return f"{original.stem}: sparse vs dense (same expansion) max rel diff {np.abs(ref - want).max() / np.abs(want).max():.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spinning", action="store_true",
                        help="let idle thread pools busy-wait (the runtimes' default), each model timed in bursts of 5 runs")
    parser.add_argument("--tvm-trials", type=int, default=DEFAULT_TRIALS, help="MetaSchedule trials per batch for the tvm variant")
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "original"],
                        default=[v for v in VARIANTS if v != "original"],
                        help="widened variants to time against the original (fewer: warmer caches)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads ({'spinning' if args.spinning else 'no spinning'}), alpha {ALPHA}, "
          f"median of {args.repeats} interleaved runs; tvm: {args.tvm_trials} MetaSchedule trials per batch")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for export in (export_ffn, export_encoder):
            original = export(folder)
            rows += bench_model(original, folder, args)
            if {"dense", "sparse (densify)"} <= set(args.variants):
                print(check_outputs(original, folder, args.threads))
    print(format_table(
        ("model", "variant", "bytes vs original", "batch 1 us", "batch 1 ratio", "batch 32 us", "batch 32 ratio"), rows,
        title="\nlatency in onnxruntime (CPU) against the original model",
    ))


if __name__ == "__main__":
    main()
