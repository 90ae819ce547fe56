"""Hugging Face end to end: widen a Llama-style model's gated FFNs in torch, fine-tune with fixed masks,
export to ONNX, run it in onnxruntime.

    python -m examples.hf_llama [--alpha 4] [--steps 40] [--seed 0] [--out DIR]

A tiny ``LlamaForCausalLM`` is built from a config with random weights (no download). ``fpe_expand``
traces it with torch.export on example inputs, splits every SwiGLU neuron of ``gate_proj``/``up_proj``
into ``alpha`` children (one input partition per parent for both) and prunes gate, up and down back to
the original nonzero count. The widened FFN layers are distilled for a few steps to the dense model's
logits on fresh random token sequences (no labels needed; pruned weights stay exactly zero; the rest
of the model keeps the dense weights), exported with ``export_onnx`` and run in onnxruntime next to
the dense export. The printout is what this run measured.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from neurorewrite.models import MaskedLinear, export_onnx, finetune, fpe_expand  # noqa: E402
from neurorewrite.rewriter.record import read_record  # noqa: E402
from neurorewrite.runtime.ort import ort_session  # noqa: E402
from neurorewrite.table import format_table  # noqa: E402

VOCAB, SEQ = 256, 16


def tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def tokens(batch: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # an explicit mask keeps the export simple


def ffn_nonzeros(model: torch.nn.Module) -> int:
    """Nonzero weights and biases of every module under an ``mlp``: the count FPE keeps."""
    return sum(
        int(torch.count_nonzero(p)) for name, m in model.named_modules() if name.endswith(("gate_proj", "up_proj", "down_proj"))
        for p in m.parameters()
    )


def logits(model: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**feeds).logits


def relative_error(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


def run(alpha: int, steps: int, seed: int, out: Path) -> dict[str, float]:
    dense = tiny_llama(seed)
    example = tokens(2, seed)
    wide = fpe_expand(dense, alpha=alpha, seed=seed, example_inputs=example)
    report = wide.fpe_report
    test = tokens(16, seed + 2)
    test_teacher = logits(dense, test)
    error_before = relative_error(logits(wide, test), test_teacher)
    # label-free distillation: fresh random sequences each step, the dense model's logits as the target
    batches = [(feeds, logits(dense, feeds)) for feeds in (tokens(16, seed + 100 + step) for step in range(steps))]
    masked = [m for m in wide.modules() if isinstance(m, MaskedLinear)]
    optimizer = torch.optim.Adam([p for m in masked for p in m.parameters()], lr=3e-3)  # the widened FFNs only
    finetune(wide, batches, epochs=1, optimizer=optimizer)  # mse to the logits, masks fixed
    error_after = relative_error(logits(wide, test), test_teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings about HF's shape checks
        export_onnx(dense, out / "llama.onnx", example)
        proto = export_onnx(wide, out / "llama.fpe.onnx", example)
    session = ort_session(out / "llama.fpe.onnx")
    ort_logits = session.run(None, {k: v.numpy() for k, v in test.items()})[0]
    dense_ort = ort_session(out / "llama.onnx").run(None, {k: v.numpy() for k, v in test.items()})[0]
    numbers = {
        "nnz_dense": ffn_nonzeros(dense), "nnz_fpe": ffn_nonzeros(wide),
        "pruned_revived": sum(int(torch.count_nonzero(m.weight.detach()[~m.weight_mask])) for m in masked),
        "error_before": error_before, "error_after": error_after,
        "ort_vs_torch": float(np.abs(ort_logits - logits(wide, test).numpy()).max()),
        "dense_ort_vs_fpe_ort": relative_error(ort_logits, dense_ort),
        "record_blocks": len(read_record(proto).blocks),
        "record_nnz": sum(b.nnz_after for b in read_record(proto).blocks),
    }
    rows = [
        (b.first.rsplit(".mlp", 1)[0], b.form, b.activation,
         f"{b.width_before} -> {b.width_after}", b.nnz_before, b.nnz_after)
        for b in wide.fpe_record.blocks
    ]
    print(format_table(("layer", "block", "act", "width", "nnz before", "nnz after"), rows,
                       title=f"tiny LlamaForCausalLM (random weights), fpe_expand alpha={alpha} seed={seed} "
                             f"(traced with {report.tracer})"))
    print(f"\nFFN nonzeros: dense {numbers['nnz_dense']}, expanded {numbers['nnz_fpe']}; pruned weights that came back "
          f"after fine-tuning: {numbers['pruned_revived']}")
    print(f"logits vs the dense model (relative error, {len(test['input_ids'])} held-out sequences): "
          f"{error_before:.4f} after expansion, {error_after:.4f} after {len(batches)} "
          "distillation steps")
    print(f"onnxruntime: expanded model vs torch max |diff| {numbers['ort_vs_torch']:.2e}, vs the dense export "
          f"relative error {numbers['dense_ort_vs_fpe_ort']:.4f}; the ONNX file's record: {numbers['record_blocks']} "
          f"blocks, {numbers['record_nnz']} nonzeros; files in {out}")
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the ONNX files (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.alpha, args.steps, args.seed, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(args.alpha, args.steps, args.seed, Path(tmp))


if __name__ == "__main__":
    main()
