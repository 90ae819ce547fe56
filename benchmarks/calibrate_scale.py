"""Calibration at transformer scale (issue 11, point 1): wall time, CPU time and peak memory.

    python -m benchmarks.calibrate_scale [--cases minilm bert-base] [--fit 512] [--alpha 4] [--refit-per parent]
                                         [--first-layer lead|keep]

Each case runs ``neurorewrite.expand(..., calibrate=SAMPLE)`` with the default options in a fresh
subprocess (so its peak resident memory is its own) on ``--fit`` sentences of English text padded to 64
tokens:

- ``minilm``: all-MiniLM-L6-v2 (real weights; 6 FFN blocks 384 -> 1536), alpha 4.
  Targets: under 60 s, peak memory under 2 GB.
- ``bert-base``: a BERT-base-sized encoder (12 blocks 768 -> 3072, 12 heads), random weights, the same
  tokens. Target: under 5 minutes.

Wall time on a loaded machine overstates what a quiet one takes: the load average is printed, and the
CPU time of the process (all its threads) beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import describe
from neurorewrite.table import format_table


def _child(case: str, fit: int, alpha: int, model_path: Path, extra: dict) -> None:
    """Runs in the subprocess: build the sample, calibrate, print one JSON line."""
    from benchmarks import minilm, text_corpus
    from neurorewrite.api import expand
    from neurorewrite.passes.calibrate import CalibrateOptions

    sentences = text_corpus.split()[0][:fit]
    sample = minilm.tokenize(sentences, 64)
    start, cpu = time.perf_counter(), time.process_time()
    _, report = expand(model_path, alpha=alpha, calibrate=sample, prune_by=extra.get("prune_by"),
                       calibrate_options=CalibrateOptions(**extra.get("options", {})))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    notes = report.calibration
    print(json.dumps({
        "wall": wall, "cpu": cpu, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rows": notes[0]["rows"] if notes else 0, "blocks": len(notes),
        "holdout_rmse": [round(n["holdout_rmse_after"], 4) for n in notes],
        "iterations": [n["iterations"] for n in notes], "load": os.getloadavg()[0],
        "constant_inputs": [n["constant_inputs"] for n in notes], "width": notes[0]["width"] if notes else 0,
        "cpu_parts": {k: round(sum(n["cpu_seconds"][k] for n in notes), 1) for k in ("gram", "support", "solve", "block")},
    }))


def _bert_base(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from benchmarks import minilm

    torch.manual_seed(0)
    bert = BertModel(BertConfig(), add_pooling_layer=False).eval()  # bert-base: 12 x 768 -> 3072, vocab 30522
    with torch.no_grad():  # distinct biases: the exporter would merge equal (zero) initializers
        for p in bert.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return minilm.export(path, minilm.sentence_embedder(bert))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    parser.add_argument("--fit", type=int, default=512)
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--prune-by", default=None, choices=["activation", "magnitude"])
    parser.add_argument("--refit", default="w2", choices=["w2", "block", "none"])
    parser.add_argument("--refit-per", default="child", choices=["child", "parent"])
    parser.add_argument("--max-iters", type=int, default=None, help="CG iterations (default: calibrate's)")
    parser.add_argument("--first-layer", default=None, choices=["lead", "keep"], help="default: expand's")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.fit, args.alpha, Path(args.child[1]), json.loads(args.extra))
        return
    print(f"machine: {describe()} | load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    from benchmarks import minilm

    rows = []
    extra = json.dumps({"prune_by": args.prune_by,
                        "options": {"refit": args.refit, "refit_per": args.refit_per, "max_iters": args.max_iters,
                                    "first": args.first_layer}})
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            path = Path(tmp) / f"{case}.onnx"
            minilm.export(path) if case == "minilm" else _bert_base(path)
            command = [sys.executable, "-m", "benchmarks.calibrate_scale", "--child", case, str(path),
                       "--fit", str(args.fit), "--alpha", str(args.alpha), "--extra", extra]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{case}: the calibration failed")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(case, result, flush=True)
            rows.append((case, result["blocks"], result["rows"], f"{result['wall']:.0f}", f"{result['cpu']:.0f}",
                         f"{result['rss_gb']:.2f}", f"{result['load']:.1f}"))
    print(format_table(("case", "blocks", "rows fit", "wall s", "CPU s", "peak GB", "load"), rows,
                       title=f"expand --alpha {args.alpha} --calibrate ({args.fit} sentences x 64 tokens), refit "
                       f"{args.refit} per {args.refit_per}, {args.max_iters or 'default'} CG iterations, prune-by "
                       f"{args.prune_by or 'default'}, first layer {args.first_layer or 'default'}"))


if __name__ == "__main__":
    main()
