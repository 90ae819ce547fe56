"""Tiny Hugging Face models built from configs with random weights (no hub access), for the torch tests.

Widths are those of ``/work/research/issue10/make_models.py``: hidden 32, FFN 88 (GPT-2: 4 x 32), vocab
101, 2 heads, eager attention. ``perturb`` adds N(0, 0.02) to every parameter, as training would: HF's
init sets biases to zero and norm weights to one, and the TorchScript exporter then merges the
identical tensors, which neither side of FPE rewrites (a shared bias is a near miss in ONNX).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

D, H, VOCAB = 32, 88, 101


def _decoder(model: str, config: str, layers: int, **extra: object) -> nn.Module:
    cfg = getattr(transformers, config)(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager", **extra,
    )
    return getattr(transformers, model)(cfg)


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "llama": lambda n: _decoder("LlamaModel", "LlamaConfig", n),
    "llama_lm": lambda n: _decoder("LlamaForCausalLM", "LlamaConfig", n),
    "mistral": lambda n: _decoder("MistralModel", "MistralConfig", n),
    "qwen2": lambda n: _decoder("Qwen2Model", "Qwen2Config", n),
    "gemma": lambda n: _decoder("GemmaModel", "GemmaConfig", n, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    "phi3": lambda n: _decoder("Phi3Model", "Phi3Config", n),
    "t5_gated": lambda n: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=VOCAB, d_model=D, d_kv=16, d_ff=H, num_layers=n, num_heads=2, feed_forward_proj="gated-gelu",
        use_cache=False, attn_implementation="eager")),
    "t5_relu": lambda n: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=VOCAB, d_model=D, d_kv=16, d_ff=H, num_layers=n, num_heads=2, feed_forward_proj="relu",
        use_cache=False, attn_implementation="eager")),
    "bert": lambda n: transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=n, num_attention_heads=2,
        max_position_embeddings=64, attn_implementation="eager"), add_pooling_layer=False),
    "gpt2": lambda n: transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_layer=n, n_head=2, n_positions=64, use_cache=False, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager")),
    "falcon": lambda n: transformers.FalconModel(transformers.FalconConfig(  # FalconLinear: x @ weight.T
        vocab_size=VOCAB, hidden_size=D, ffn_hidden_size=H, num_hidden_layers=n, num_attention_heads=2,
        new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False, use_cache=False,
        attn_implementation="eager")),
    "albert": lambda n: transformers.AlbertModel(transformers.AlbertConfig(  # n layers run one shared layer
        vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=n, num_attention_heads=2,
        embedding_size=16, max_position_embeddings=64, attn_implementation="eager"), add_pooling_layer=False),
    "vit": lambda n: transformers.ViTModel(transformers.ViTConfig(
        hidden_size=D, num_hidden_layers=n, num_attention_heads=2, intermediate_size=H, image_size=16, patch_size=8,
        attn_implementation="eager")),
}


def build(name: str, layers: int = 1, seed: int = 0, perturbed: bool = True) -> nn.Module:
    """The named tiny model in eval mode, with trained-like (perturbed) weights unless told otherwise."""
    torch.manual_seed(seed)
    model = BUILDERS[name](layers).eval()
    if perturbed:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def inputs(name: str, batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``build(name)``: pixels for ViT, token ids and an all-ones mask otherwise (the
    explicit mask keeps transformers away from ``torch.diff``, which the TorchScript exporter lacks)."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
