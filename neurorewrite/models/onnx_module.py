"""Lift an ONNX MLP graph into a trainable torch module with its FPE masks.

:class:`OnnxMLP` evaluates the graph node by node with the torch ops of
:mod:`neurorewrite.models.onnx_ops`. Every linear layer whose weight (and bias) is a constant used
by that layer alone becomes a :class:`MaskedLinear` holding the effective ``W (out, in)`` and ``b``
(Gemm alpha/beta folded in), masked to its current nonzero pattern, so training keeps the exact
nonzero count. Everything else (shared or scalar constants) is a frozen buffer. ``weights()`` gives
the trained weights back in the form ``rewriter.editor.replace_weights`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from neurorewrite.errors import NoBlocksError, UnsupportedModelError
from neurorewrite.models.fpe import MaskedLinear, linear_arrays
from neurorewrite.models.onnx_ops import OPS
from neurorewrite.rewriter.graph import GraphIndex, node_label
from neurorewrite.rewriter.linear import Linear, find_linears, read_weights

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class _Step:
    """One node to evaluate: ``kind`` is an op name, ``"linear"`` (x W^T [+ b]) or ``"bias"`` (x + b)."""

    kind: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict
    layer: str = ""


LIFTED_FORMS = ("Gemm", "MatMul+Add", "MatMul")  # linears the "linear" step computes (x W^T + b on the last axis)


def _trainable(index: GraphIndex, lin: Linear) -> bool:
    if lin.op not in LIFTED_FORMS or lin.bias_node is not None or lin.read_only:
        return False
    for name in (lin.weight, lin.bias):
        if name is None:
            continue
        if index.constant_source(name) not in ("initializer", "constant"):
            return False
        if len(index.consumers.get(name, [])) > 1 or name in index.graph_outputs:
            return False
    return True


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxMLP(nn.Module):
    """The function of an ONNX graph with one float input, as a torch module (first output only)."""

    def __init__(self, model: onnx.ModelProto, where: str = "model") -> None:
        super().__init__()
        graph = model.graph
        index = GraphIndex.build(graph)
        inits = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type not in FLOAT_TYPES:
            raise UnsupportedModelError(f"{where}: fine-tuning needs exactly one float graph input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim)
        self.output_name = graph.output[0].name
        self.layers = nn.ModuleDict()
        self.linears: dict[str, Linear] = {}
        steps = self._lift_linears(index, where)
        self._constants: dict[str, str] = {}
        self._lift_constants(index)
        self.steps = self._plan(model, index, steps, where)

    def _lift_linears(self, index: GraphIndex, where: str) -> dict[int, _Step]:
        steps: dict[int, _Step] = {}
        for lin in find_linears(index).values():
            if not _trainable(index, lin):
                continue
            key = f"linear{len(self.layers)}"
            w, b = read_weights(index, lin)
            self.layers[key] = MaskedLinear.from_arrays(w, b)
            self.linears[key] = lin
            with_bias = lin.bias is not None and lin.add_node is None
            steps[lin.node] = _Step("linear", (lin.data_input,), index.graph.node[lin.node].output[0], {"bias": with_bias}, key)
            if lin.add_node is not None:
                steps[lin.add_node] = _Step("bias", (index.graph.node[lin.node].output[0],), lin.output, {}, key)
        if not self.layers:
            raise NoBlocksError(f"{where}: no linear layer with constant, unshared weights to fine-tune")
        return steps

    def _lift_constants(self, index: GraphIndex) -> None:
        trained = {n for lin in self.linears.values() for n in (lin.weight, lin.bias) if n}
        for name in list(index.initializers) + list(index.constant_nodes):
            if name in trained:
                continue
            value = index.constant_value(name)
            if value is None:
                continue
            key = f"const{len(self._constants)}"
            self.register_buffer(key, torch.from_numpy(np.array(value)), persistent=False)
            self._constants[name] = key

    def _plan(self, model: onnx.ModelProto, index: GraphIndex, lifted: dict[int, _Step], where: str) -> list[_Step]:
        steps, unsupported = [], []
        for i, node in enumerate(model.graph.node):
            if i in lifted:
                steps.append(lifted[i])
            elif node.op_type == "Constant" and node.output[0] in index.constant_nodes:
                continue  # its value is a buffer or, for a trained linear, the layer's parameter
            elif node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                unsupported.append(f"{node.op_type} ({node_label(node, i)})")
            else:
                steps.append(_Step(node.op_type, tuple(node.input), node.output[0], _attrs(node)))
        if unsupported:
            raise UnsupportedModelError(
                f"{where}: cannot lift into torch for fine-tuning: unsupported node(s) {', '.join(unsupported[:8])}"
            )
        return steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor | None] = {self.input_name: x, "": None}
        for name, key in self._constants.items():
            env[name] = getattr(self, key)
        for step in self.steps:
            if step.kind == "linear":
                layer = self.layers[step.layer]
                value = env[step.inputs[0]] @ layer.weight.T
                env[step.output] = value + layer.bias if step.attrs["bias"] else value
            elif step.kind == "bias":
                env[step.output] = env[step.inputs[0]] + self.layers[step.layer].bias
            else:
                env[step.output] = OPS[step.kind]([env[n] for n in step.inputs], step.attrs)
        return env[self.output_name]

    def weights(self) -> list[tuple[Linear, np.ndarray, np.ndarray | None]]:
        """``(linear, W (out, in), b)`` of every lifted layer, masks applied and support restored."""
        out = []
        for key, lin in self.linears.items():
            layer = self.layers[key]
            layer.apply_mask()
            layer.restore_support()
            out.append((lin, *linear_arrays(layer)))
        return out
