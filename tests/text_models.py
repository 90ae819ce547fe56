"""A tiny Hugging Face BERT sentence embedder exported by torch.onnx, and token samples with padding.

Random weights, real architecture: the graph has the ops a BERT export writes (shape arithmetic for the
attention mask, Gather embeddings, LayerNormalization, GELU as Erf, mean pooling over the mask), three
integer inputs (``input_ids``, ``attention_mask``, ``token_type_ids``) and one float output.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VOCAB = 60


def tiny_bert(seed: int = 0, hidden: int = 32, layers: int = 2, intermediate: int = 64):  # noqa: ANN201
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=intermediate, max_position_embeddings=32)
    bert = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # no two parameters alike: the exporter merges equal initializers (zero biases)
        for p in bert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bert


class Embedder:
    """``bert`` with mean pooling over the mask: the module torch.onnx exports."""

    def __new__(cls, bert):  # noqa: ANN001, ANN204
        import torch

        class _Embedder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN202
                out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
                m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
                return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)

        return _Embedder().eval()


def export_embedder(module) -> onnx.ModelProto:  # noqa: ANN001
    import torch

    ids = torch.randint(0, VOCAB, (2, 6))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=["embedding"], dynamic_axes={**{k: axes for k in INPUTS}, "embedding": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def token_sample(n: int = 40, length: int = 12, seed: int = 0, garbage: int | None = None) -> dict[str, np.ndarray]:
    """``n`` right-padded sequences of 3..length tokens; padded ids are 0 (or ``garbage`` ids if given)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (n, length)) * mask
    if garbage is not None:
        ids = np.where(mask == 1, ids, np.random.default_rng(garbage).integers(1, VOCAB, (n, length)))
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
