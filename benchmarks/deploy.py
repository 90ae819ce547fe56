"""Deploy benchmark: original vs widened (alpha 4) models, each runtime as a user runs it, and side by side.

Models: an FFN block 768 -> 3072 -> 768 (GELU) and a 2-layer torch TransformerEncoder (d_model 256,
FFN 1024, sequence 16; exported with dynamo=True); on request (``--models minilm``) the pretrained
all-MiniLM-L6-v2 sentence embedder (6 layers, hidden 384, FFN 1536; token ids, attention mask and token
types as inputs, sequence 16), whose TVM libraries take its mask arithmetic as constants
(:mod:`neurorewrite.passes.fold_static`). Variants, one function each: the original; the FPE
expansion as ``dense`` (zeros stored), ``grouped`` (shared split), ``structured`` (``--structured``:
blocks split, tied outgoing weights, one MatMul per child), ``sparse`` (CSR SparseLinear) through
both standard-op conversions, all in onnxruntime; and three TVM libraries of the ``sparse`` file built
by ``neurorewrite compile`` with the kernel choice measured on this machine: ``tvm`` (one library per
batch, ``--shape``, tuned with ``--tvm-trials`` MetaSchedule trials), ``tvm any batch`` (one library
without ``--shape``: symbolic batch, a kernel per call) and ``tvm untied`` (the sparse file with its
children untied, as a fine-tuned model has them: the pattern of the expansion, values perturbed by 1%;
one library per batch, tuned). ``sparse calibrated (densify)`` and ``tvm calibrated`` run the file
``expand --calibrate`` writes with its defaults (tiered split, W2 refit) on a Gaussian sample of
:data:`SAMPLE_ROWS` rows: both runtimes' preparation folds the children the prune left without an input
into the next layer's bias (:mod:`neurorewrite.passes.fold_constant`).

Every onnxruntime variant runs through ``ort_session``, as a user runs it: the ``dense`` file is lowered to
``sparse`` at load (:mod:`neurorewrite.passes.prepare`) and so runs as ``sparse (densify)`` does; ``dense (as
stored)`` is that file in a plain InferenceSession (what the ``dense`` rows in benchmarks/RESULTS.md from
before that change timed).

Two harnesses (``--harness``): ``process`` (default; :mod:`neurorewrite.runtime.bench_process`: each
model alone in its own process with its runtime's default thread pool, spinning included, ``--threads``
threads, rounds alternating) and ``interleaved`` (:mod:`neurorewrite.runtime.bench`: all models in one
process, alternating call by call, pools not spinning); ``both`` prints both tables.
Per variant: the bytes of weights its runtime reads per call and the multiply-adds per input row of
its linear layers (zeros a dense form stores count: its runtime multiplies them; attention products
of the encoder not included), then median latency and ratio at batch 1 and 32. Prints the machine
(CPU, SIMD width) and the load average before and after.

Run: ``python -m benchmarks.deploy [--harness process|interleaved|both] [--threads T] [--tvm-trials N]
[--variants ...] [--models ffn encoder]`` from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from neurorewrite.api import expand
from neurorewrite.runtime.bench import BenchResult, bench_sessions, file_bytes
from neurorewrite.runtime.bench_process import Worker, bench_processes
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS
from neurorewrite.table import format_table

ALPHA = 4
BATCHES = (1, 32)
SAMPLE_ROWS = 6144  # input rows (tokens) of the calibration sample: more than twice the widest layer's inputs
MINILM_SENTENCES = 512  # MiniLM's calibration sample (benchmarks/RESULTS.md's MiniLM runs use 512 as well)


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


@dataclass
class Deployed:
    """A variant ready to time: its worker (process harness), a factory for an in-process session
    (interleaved harness), and per batch the weight bytes its runtime reads and its multiply-adds per row."""

    worker: Worker
    session: Callable[[], object]
    weight_bytes: Callable[[int], float]
    macs_per_row: Callable[[int], float]
    file: Path | None = None


Variant = Callable[[Path, Path, argparse.Namespace], Deployed]  # (original, folder, options)


def _written_path(original: Path, folder: Path, name: str) -> Path:
    return folder / f"{original.stem}.{name}.onnx"


def _written(original: Path, folder: Path, name: str, **options: object) -> Path:
    """The widened file ``name`` of ``original``, expanded with ``options`` on first use."""
    out = _written_path(original, folder, name)
    if not out.exists():
        expand(original, alpha=ALPHA, output=out, **options)
    return out


def _untied(original: Path, folder: Path) -> Path:
    """The ``sparse`` file with every stored weight scaled by its own ``1 + 0.01 N(0, 1)``: the children's
    copies of a parent's outgoing weight differ, as after calibration or fine-tuning; the pattern is kept."""
    out = _written_path(original, folder, "untied")
    if not out.exists():
        model = onnx.load(str(_written(original, folder, "sparse", split="random", format="sparse")))
        rng = np.random.default_rng(0)
        values = {n.input[1] for n in model.graph.node if n.op_type == "SparseLinear"}
        for init in model.graph.initializer:
            if init.name in values:
                array = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(
                    (array * (1 + 0.01 * rng.standard_normal(array.shape))).astype(np.float32), init.name))
        onnx.save(model, str(out))
    return out


def _calibrated(original: Path, folder: Path) -> Path:
    """The ``sparse`` file ``expand --calibrate`` writes with its defaults, on a standard normal sample of
    :data:`SAMPLE_ROWS` input rows (the batch dimension sized to hold them); MiniLM on sentences of the
    text corpus (:data:`MINILM_SENTENCES`, padded to 64 tokens)."""
    out = _written_path(original, folder, "calibrated")
    if not out.exists():
        if original.stem == "minilm":
            from benchmarks.minilm import tokenize
            from benchmarks.text_corpus import sentences

            sample = tokenize(sentences()[:MINILM_SENTENCES], 64)
        else:
            (spec,) = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).get_inputs()
            rest = [int(d) for d in spec.shape[1:]]
            batch = -(-SAMPLE_ROWS // int(np.prod(rest, dtype=np.int64)))
            sample = {spec.name: np.random.default_rng(0).standard_normal([batch, *rest]).astype(np.float32)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expand(original, alpha=ALPHA, calibrate=sample, format="sparse", output=out)
    return out


def export_minilm(folder: Path) -> Path:
    """``minilm.onnx``: the pretrained all-MiniLM-L6-v2 sentence embedder (:mod:`benchmarks.minilm`)."""
    from benchmarks.minilm import export

    return export(folder / "minilm.onnx")


def ort_costs(path: Path, method: str = "densify") -> tuple[float, float]:
    """(weight bytes, multiply-adds per row) of the linear layers onnxruntime runs for ``path``: MatMul and
    Gemm with a constant weight, after the preparation ``ort_session`` applies (zeros included)."""
    from neurorewrite.passes.prepare import prepare_for_runtime

    model, _ = prepare_for_runtime(onnx.load(str(path)), "onnxruntime", method)
    return _linear_costs(model, gathers=True)


def _ort(path: Path, args: argparse.Namespace, method: str = "densify") -> Deployed:
    weights, macs = ort_costs(path, method)
    return Deployed(
        Worker("ort", str(path), threads=args.threads, sparse_method=method),
        lambda: ort_session(path, providers=["CPUExecutionProvider"], threads=args.threads, sparse_method=method,
                            spinning=False),
        lambda n: weights, lambda n: macs, path,
    )


def original_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(original, args)


def dense_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(_written(original, folder, "dense", split="random"), args)


def dense_stored_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    """The ``dense`` file as plain onnxruntime runs it, without ``ort_session``'s lowering to sparse."""
    from neurorewrite.executor import session_options

    path = _written(original, folder, "dense", split="random")
    weights, macs = _linear_costs(onnx.load(str(path)), gathers=False)
    return Deployed(
        Worker("ort", str(path), threads=args.threads, prepare=False),
        lambda: ort.InferenceSession(str(path), session_options(args.threads, False), providers=["CPUExecutionProvider"]),
        lambda n: weights, lambda n: macs, path,
    )


def grouped_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(_written(original, folder, "grouped", split="shared", format="grouped"), args)


def structured_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(_written(original, folder, "structured", structured=True), args)


def sparse_densify_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(_written(original, folder, "sparse", split="random", format="sparse"), args, "densify")


def sparse_gather_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(_written(original, folder, "sparse", split="random", format="sparse"), args, "gather")


def sparse_calibrated_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _ort(_calibrated(original, folder), args, "densify")


def _tvm(path: Path, folder: Path, args: argparse.Namespace, symbolic: bool, tag: str) -> Deployed:
    """``path`` compiled by ``neurorewrite compile`` (kernel choice measured here): one library for every
    batch (``symbolic``) or one per batch, tuned with ``--tvm-trials`` trials."""
    from neurorewrite.runtime.tvm_compile import compile
    from neurorewrite.runtime.tvm_session import TvmSession, input_specs, set_threads, static_shape
    from neurorewrite.runtime.tvm_run import CompiledModel

    set_threads(args.threads, spinning=True)  # the kernel choice is timed with the deployed thread count
    model = onnx.load(str(path))
    specs = input_specs(model)
    libraries, reports = {}, {}
    for batch in [0] if symbolic else BATCHES:
        lib = folder / f"{path.stem}.{tag}.{'any' if symbolic else f'b{batch}'}.so"
        shapes = None if symbolic else {s.name: static_shape(s, batch) for s in specs}
        tune = args.tvm_trials > 0 and not symbolic
        _, reports[batch] = compile(model, "llvm", output=lib, shapes=shapes, tune=tune, trials=args.tvm_trials,
                                    database=folder / f"{path.stem}.{tag}.tuning")
        libraries[batch] = str(lib)
    dense_weights, dense_macs = _dense_parts(path)

    def layers(n: int) -> list[tuple[dict, str]]:
        report = reports[0 if symbolic else n]
        out = []
        for k in report.sparse_kernels:
            chosen = next((name for start, name in reversed(k["ranges"]) if n >= start), k["ranges"][0][1])
            out.append((k, chosen))
        return out

    def weight_bytes(n: int) -> float:
        return dense_weights + sum(k["weight_bytes"][chosen] for k, chosen in layers(n))

    def macs(n: int) -> float:
        return dense_macs + sum(k["nonzeros"] for k, _ in layers(n))

    worker = Worker("tvm", libraries[0] if symbolic else "", threads=args.threads,
                    libraries={} if symbolic else {b: libraries[b] for b in BATCHES})

    def session() -> TvmSession:
        set_threads(args.threads, spinning=False)
        return TvmSession(specs, {b: CompiledModel(lib) for b, lib in libraries.items()})

    return Deployed(worker, session, weight_bytes, macs, None)


def _dense_parts(path: Path) -> tuple[float, float]:
    """Weight bytes and multiply-adds per row of the standard MatMul/Gemm layers of a sparse file."""
    return _linear_costs(onnx.load(str(path)), gathers=False)


def _linear_costs(model: onnx.ModelProto, gathers: bool) -> tuple[float, float]:
    """(weight bytes, multiply-adds per row) of the MatMul/Gemm layers with a constant weight (zeros
    included); with ``gathers``, also the values each Gather reads per row (the ELL gather conversion)."""
    from neurorewrite.rewriter.graph import GraphIndex

    index = GraphIndex.build(model.graph)
    weights, macs = 0.0, 0.0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            w = index.constant_value(node.input[1])
            if w is not None and w.ndim >= 2:
                weights += w.nbytes
                macs += w.size
        elif gathers and node.op_type == "Gather" and len(node.input) > 1:
            w = index.constant_value(node.input[1])
            macs += 0 if w is None else w.size
    return weights, macs


def tvm_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _tvm(_written(original, folder, "sparse", split="random", format="sparse"), folder, args, False, "fixed")


def tvm_any_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _tvm(_written(original, folder, "sparse", split="random", format="sparse"), folder, args, True, "any")


def tvm_untied_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _tvm(_untied(original, folder), folder, args, False, "fixed")


def tvm_calibrated_variant(original: Path, folder: Path, args: argparse.Namespace) -> Deployed:
    return _tvm(_calibrated(original, folder), folder, args, False, "fixed")


VARIANTS: dict[str, Variant] = {
    "original": original_variant,
    "dense": dense_variant,
    "dense (as stored)": dense_stored_variant,
    "grouped": grouped_variant,
    "structured": structured_variant,
    "sparse (densify)": sparse_densify_variant,
    "sparse (gather)": sparse_gather_variant,
    "sparse calibrated (densify)": sparse_calibrated_variant,
    "tvm": tvm_variant,
    "tvm any batch": tvm_any_variant,
    "tvm untied": tvm_untied_variant,
    "tvm calibrated": tvm_calibrated_variant,
}


def bench_model(original: Path, folder: Path, args: argparse.Namespace, harness: str) -> list[tuple[str, ...]]:
    chosen = ["original", *[v for v in VARIANTS if v in args.variants]]
    deployed = {label: VARIANTS[label](original, folder, args) for label in chosen}
    if harness == "process":
        result: BenchResult = bench_processes({label: d.worker for label, d in deployed.items()}, BATCHES,
                                              rounds=args.rounds, runs=args.runs)
    else:
        result = bench_sessions({label: d.session() for label, d in deployed.items()}, BATCHES, repeats=args.repeats)
    base_bytes = file_bytes(original)
    rows = []
    for label, d in deployed.items():
        size = f"{file_bytes(d.file) / base_bytes:.2f}x" if d.file is not None else "-"
        row = [original.stem, label, size]
        for n in BATCHES:
            row += [f"{d.weight_bytes(n) / 1e6:.1f}", f"{d.macs_per_row(n) / 1e6:.2f}",
                    f"{result.median[(label, n)] * 1e6:.0f}", f"{result.ratio(label, n):.2f}x"]
        rows.append(tuple(row))
    return rows


def check_outputs(original: Path, folder: Path, threads: int) -> str:
    """Max relative difference of the ``sparse`` file against the ``dense`` file (same expansion) on one input."""
    dense = ort_session(_written_path(original, folder, "dense"), providers=["CPUExecutionProvider"], threads=threads)
    x = np.random.default_rng(0).standard_normal([2] + [d for d in dense.get_inputs()[0].shape[1:]]).astype(np.float32)
    ref = ort_session(_written_path(original, folder, "sparse"), providers=["CPUExecutionProvider"], threads=threads)
    got, want = ref.run(None, {"x": x})[0], dense.run(None, {"x": x})[0]
    return f"{original.stem}: sparse vs dense (same expansion) max rel diff {np.abs(got - want).max() / np.abs(want).max():.1e}"


def main() -> None:
    from benchmarks.peak import cpu_line, load_average

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harness", choices=("process", "interleaved", "both"), default="process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="process harness: rounds (a fresh process per model each)")
    parser.add_argument("--runs", type=int, default=50, help="process harness: timed runs per process and batch")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved harness: timed runs per model and batch")
    parser.add_argument("--tvm-trials", type=int, default=DEFAULT_TRIALS, help="MetaSchedule trials per batch for the fixed-shape tvm variants")
    parser.add_argument("--models", nargs="+", choices=("ffn", "encoder", "minilm"), default=["ffn", "encoder"])
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "original"],
                        default=[v for v in VARIANTS if v != "original"], help="widened variants to time against the original")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    print(load_average())
    exports = {"ffn": export_ffn, "encoder": export_encoder, "minilm": export_minilm}
    harnesses = ["process", "interleaved"] if args.harness == "both" else [args.harness]
    tables: dict[str, list] = {h: [] for h in harnesses}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            original = exports[name](folder)
            for harness in harnesses:
                tables[harness] += bench_model(original, folder, args, harness)
            if {"dense", "sparse (densify)"} <= set(args.variants):
                print(check_outputs(original, folder, args.threads))
    headers = ["model", "variant", "file vs original"]
    for n in BATCHES:
        headers += [f"b{n} weight MB", f"b{n} M MAC/row", f"batch {n} us", f"batch {n} ratio"]
    for harness in harnesses:
        how = (f"each model alone in its own process, runtime defaults (pools spinning), {args.threads} threads, "
               f"median over {args.rounds} alternating rounds of the median of {args.runs} runs") if harness == "process" else (
               f"all models in one process, interleaved call by call, pools not spinning, {args.threads} threads, "
               f"median of {args.repeats} runs")
        print(format_table(headers, tables[harness], title=f"\nlatency against the original model ({harness} harness: {how}; "
                                                            f"onnxruntime {ort.__version__}; tvm: {args.tvm_trials} MetaSchedule trials per batch)"))
    print(load_average())


if __name__ == "__main__":
    main()
