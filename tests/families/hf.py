"""Tiny models of real families from their ``transformers`` configs (random weights, no download),
exported with both torch exporters and post-processed the way deployments do it.

Built on demand and cached per test session (:class:`Families`): a test asks for ``("llama", "ts")``
and gets the path of ``llama.ts.onnx``. Dimensions make the FFN widths recognisable: hidden ``D=32``,
intermediate ``H=88`` (GPT-2: ``4D=128``; the pointwise-conv MLP: ``24 -> 96 -> 24``).

- ``ts``: ``torch.onnx.export(dynamo=False, opset_version=17)`` with dynamic batch/sequence axes;
  ``dynamo``: ``dynamo=True, opset_version=18`` with dynamic shapes.
- ``perturb=True`` (the default) adds N(0, 0.02) to every parameter, as training does: HF's init sets
  biases to 0 and norm weights to 1, and both exporters then merge the identical tensors (one bias
  initializer read by many nodes, or ``Identity`` copies of it). ``perturb=False`` keeps that init.
- variants of a file (:meth:`Families.variant`): onnxruntime's transformer optimizer (``ortopt``,
  BiasGelu / FastGelu / SkipLayerNormalization), dynamic and QDQ quantization (``qdyn``, ``qdq``),
  fp32 -> fp16 with onnxruntime's converter (``fp16``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

D, H, VOCAB, HEADS, SEQ, BATCH = 32, 88, 101, 2, 5, 2
GATED = ("llama", "mistral", "qwen2", "gemma", "t5_gated_gelu", "phi3")
FAMILIES = (*GATED, "t5_relu", "gpt2", "bert", "conv_mlp", "llama_fp16", "llama_bf16")


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def _wrapped(model, kind: str):
    nn = _torch().nn

    class Ids(nn.Module):
        """``input_ids -> last_hidden_state``; an explicit all-ones mask (without it transformers 5 looks
        for packed sequences with ``torch.diff``, which the TorchScript exporter cannot export)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            mask = _torch().ones_like(input_ids)
            return self.model(input_ids=input_ids, attention_mask=mask, return_dict=False)[0]

    return Ids() if kind == "ids" else model


def _decoder(cls: str, config: str, **extra) -> Callable[[], object]:
    def build():
        import transformers

        cfg = getattr(transformers, config)(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=1, num_attention_heads=HEADS,
            num_key_value_heads=HEADS, max_position_embeddings=64, use_cache=False, **extra,
        )
        cfg._attn_implementation = "eager"
        return getattr(transformers, cls)(cfg)

    return build


def _t5(ff: str) -> Callable[[], object]:
    def build():
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=VOCAB, d_model=D, d_kv=16, d_ff=H, num_layers=1, num_heads=HEADS,
                       feed_forward_proj=ff, use_cache=False)
        cfg._attn_implementation = "eager"
        return T5EncoderModel(cfg)

    return build


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=1, n_head=HEADS, n_positions=64, use_cache=False)
    cfg._attn_implementation = "eager"
    return GPT2Model(cfg)


def _bert(act: str = "gelu", layers: int = 1) -> Callable[[], object]:
    def build():
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=layers,
                         num_attention_heads=HEADS, max_position_embeddings=64, hidden_act=act)
        cfg._attn_implementation = "eager"
        return BertModel(cfg, add_pooling_layer=False)

    return build


def _albert():
    """ALBERT: two layers that run one shared layer (one FFN, read twice)."""
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                       num_attention_heads=HEADS, embedding_size=16, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return AlbertModel(cfg, add_pooling_layer=False)


def _conv_mlp():
    """A ConvNeXt-style pointwise MLP on NCHW: Conv2d(24, 96, 1) -> GELU -> Conv2d(96, 24, 1)."""
    nn = _torch().nn

    class ConvMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Conv2d(24, 96, 1), nn.GELU(), nn.Conv2d(96, 24, 1)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    return ConvMLP()


BUILDERS: dict[str, tuple[Callable[[], object], str]] = {
    "llama": (_decoder("LlamaModel", "LlamaConfig"), "ids"),
    "mistral": (_decoder("MistralModel", "MistralConfig", sliding_window=None), "ids"),
    "qwen2": (_decoder("Qwen2Model", "Qwen2Config"), "ids"),
    "gemma": (_decoder("GemmaModel", "GemmaConfig", head_dim=16, hidden_activation="gelu_pytorch_tanh"), "ids"),
    "phi3": (_decoder("Phi3Model", "Phi3Config", pad_token_id=0), "ids"),
    "t5_gated_gelu": (_t5("gated-gelu"), "ids"),
    "t5_relu": (_t5("relu"), "ids"),
    "gpt2": (_gpt2, "ids"),
    "bert": (_bert(), "ids"),
    "bert_quick_gelu": (_bert("quick_gelu"), "ids"),
    "bert2": (_bert(layers=2), "ids"),
    "albert": (_albert, "ids"),
    "conv_mlp": (_conv_mlp, "pixels"),
    "llama_fp16": (_decoder("LlamaModel", "LlamaConfig"), "ids"),
    "llama_bf16": (_decoder("LlamaModel", "LlamaConfig"), "ids"),
}
DTYPES = {"llama_fp16": "float16", "llama_bf16": "bfloat16"}


def example_input(family: str):
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    if BUILDERS[family][1] == "pixels":
        return torch.randn(BATCH, 24, 6, 6, generator=g)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def feeds(family: str, batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for a family's exported file (a batch and sequence length other than the export's)."""
    rng = np.random.default_rng(seed)
    if BUILDERS[family][1] == "pixels":
        return {"x": rng.standard_normal((batch, 24, 6, 6)).astype(np.float32)}
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)}


def build_module(family: str, perturb: bool = True):
    torch = _torch()
    torch.manual_seed(0)
    build, kind = BUILDERS[family]
    model = build()
    model.eval()
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    if family in DTYPES:
        model = model.to(getattr(torch, DTYPES[family]))
    return _wrapped(model, kind)


def export(family: str, exporter: str, path: Path, perturb: bool = True) -> Path:
    """Export one family with ``ts`` or ``dynamo`` to ``path``."""
    torch = _torch()
    module = build_module(family, perturb)
    example = example_input(family)
    name = "x" if BUILDERS[family][1] == "pixels" else "input_ids"
    axes = {0: "batch"} if name == "x" else {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17, input_names=[name],
                              output_names=["out"], dynamic_axes={name: axes, "out": {0: "batch"}})
        else:
            from torch.export import Dim

            dims = {k: Dim(v, min=1, max=64) if v == "batch" else Dim(v, min=2, max=63) for k, v in axes.items()}
            prog = torch.onnx.export(module, (example,), dynamo=True, opset_version=18, input_names=[name],
                                     output_names=["out"], dynamic_shapes={name: dims}, external_data=False)
            prog.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))
    return path


class _Reader:
    """Calibration batches for static quantization."""

    def __init__(self, n: int = 4) -> None:
        g = np.random.default_rng(0)
        self.items = iter([{"input_ids": g.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int64)} for _ in range(n)])

    def get_next(self):
        return next(self.items, None)


def make_variant(src: Path, kind: str, dst: Path, family: str) -> Path:
    """A deployment variant of an exported file, made by the real tools."""
    if kind.startswith("ortopt"):
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        model_type = "gpt2" if family == "gpt2" else "bert"
        options = FusionOptions(model_type)
        if kind == "ortopt_nobiasgelu":
            options.enable_bias_gelu = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = optimize_model(str(src), model_type=model_type, num_heads=HEADS, hidden_size=D, opt_level=0,
                               use_gpu=False, optimization_options=options)
        m.save_model_to_file(str(dst))
    elif kind == "qdyn":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    elif kind == "qdq":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    elif kind == "fp16":
        from onnxruntime.transformers.onnx_model import OnnxModel

        m = OnnxModel(onnx.load(str(src)))
        m.convert_float_to_float16(keep_io_types=True)
        m.save_model_to_file(str(dst))
    else:
        raise ValueError(kind)
    return dst


class Families:
    """Builds each requested file once per test run under ``root``, which pytest-xdist's workers share:
    a lock per file makes the first worker that asks build it and the others wait for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _once(self, name: str, build: Callable[[Path], Path]) -> Path:
        from filelock import FileLock

        path = self.root / name
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                partial = path.with_suffix(".partial.onnx")
                build(partial)
                partial.replace(path)
        return path

    def path(self, family: str, exporter: str, perturb: bool = True) -> Path:
        tag = "p" if perturb else "init"
        return self._once(f"{family}.{exporter}.{tag}.onnx", lambda p: export(family, exporter, p, perturb))

    def variant(self, family: str, exporter: str, kind: str, perturb: bool = True) -> Path:
        src = self.path(family, exporter, perturb)
        return self._once(f"{src.stem}.{kind}.onnx", lambda p: make_variant(src, kind, p, family))
