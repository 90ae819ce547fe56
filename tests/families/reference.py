"""A numpy/torch forward of one block from the weights stored in a model, to check what onnxruntime computes."""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.executor import run_with_outputs
from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear, features_last, read_weights


def activation(label: str, z: np.ndarray) -> np.ndarray:
    import torch

    name = label.replace(" (gated)", "").replace(" [com.microsoft]", "")
    t = torch.from_numpy(z.astype(np.float64))
    if name == "Relu":
        return np.maximum(z, 0.0)
    if name == "SiLU":
        return torch.nn.functional.silu(t).numpy()
    if name == "Gelu(erf)":
        return torch.nn.functional.gelu(t).numpy()
    if name == "Gelu(tanh)":
        return torch.nn.functional.gelu(t, approximate="tanh").numpy()
    if name == "QuickGelu":
        return (t * torch.sigmoid(1.702 * t)).numpy()
    raise ValueError(f"no reference for activation {label!r}")


def _linear(index: GraphIndex, lin: Linear, x: np.ndarray) -> np.ndarray:
    w, b = read_weights(index, lin)
    y = x @ w.T.astype(np.float64)
    return y if b is None else y + b.astype(np.float64)


def block_io(model: onnx.ModelProto, block: MLPBlock, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The block's input rows and output rows as onnxruntime computes them (features last)."""
    outs = run_with_outputs(model, feeds, [block.first.data_input, block.second.output])
    x = features_last(outs[block.first.data_input], block.first, block.in_features).astype(np.float64)
    y = features_last(outs[block.second.output], block.second, block.out_features).astype(np.float64)
    return x, y


def block_reference(model: onnx.ModelProto, block: MLPBlock, x: np.ndarray) -> np.ndarray:
    """``second(act(first(x)))`` (gated: ``second(act(gate(x)) * up(x))``) from the stored weights; a bias
    that SkipLayerNormalization adds after the block is not included (as in the graph's block output)."""
    index = GraphIndex.build(model.graph)
    pre = _linear(index, block.first, x)
    if block.split is not None:
        half = pre.shape[1] // 2
        gate, up = (pre[:, :half], pre[:, half:]) if block.split.gate_half == 0 else (pre[:, half:], pre[:, :half])
        hidden = activation(block.activation, gate) * up
    elif block.up is not None:
        hidden = activation(block.activation, pre) * _linear(index, block.up, x)
    else:
        hidden = activation(block.activation, pre)
    return _linear(index, block.second, hidden)
