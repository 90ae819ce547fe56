"""Export torch models (FPE-expanded or not) to ONNX files the rewriter and runtimes accept.

``export_onnx`` runs the TorchScript exporter (``dynamo=False``: fast, and an ``nn.Linear`` becomes
one Gemm whose initializer is the weight as stored), makes every masked layer hold exactly its mask's
nonzero count, writes the FPE record of ``fpe_expand`` (:mod:`neurorewrite.rewriter.record`, the one
``neurorewrite expand`` writes) into ``metadata_props``, and saves atomically. A structured model is
written in the ``grouped`` format (:mod:`neurorewrite.rewriter.lowering`), as ``expand --structured``
writes it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from neurorewrite.errors import VerificationError
from neurorewrite.models.fpe import masked_layers
from neurorewrite.models.fpe_structured import untied
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights
from neurorewrite.rewriter.io import save_model
from neurorewrite.rewriter.lowering import lower_blocks
from neurorewrite.rewriter.record import FPERecord, write_record


def _to_proto(model: nn.Module, args: tuple[torch.Tensor, ...], input_names: Sequence[str],
              output_names: Sequence[str], opset: int | None, dynamic_batch: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is what we want here
        torch.onnx.export(
            model, args, buffer, dynamo=False, input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _weight_key(w: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return tuple(w.shape), np.ascontiguousarray(w).tobytes()


def onnx_record(proto: onnx.ModelProto, record: FPERecord, model: nn.Module) -> FPERecord:
    """The record of a torch expansion for its exported graph: each torch block matched to the ONNX
    block whose first linear holds the same weights (exact, so names and extra blocks of the graph do
    not matter), named as ``neurorewrite expand`` names it, with the module paths kept in
    ``torch_first``/``torch_second``. Rows follow the graph's block order."""
    found = find_blocks(proto).blocks
    index = GraphIndex.build(proto.graph)
    by_weight = {_weight_key(read_weights(index, b.first)[0]): b for b in found}
    rows = []
    for block in record.blocks:
        layer = model.get_submodule(block.first)
        onnx_block = by_weight.get(_weight_key(layer.weight.detach().cpu().numpy()))
        if onnx_block is None:
            raise VerificationError(
                f"the exported graph has no MLP block whose first linear holds the weights of {block.first} "
                f"({len(found)} blocks found); is the forward pass using every expanded module?"
            )
        rows.append((onnx_block.first.node, replace(
            block, name=onnx_block.name, first=onnx_block.first.name, second=onnx_block.second.name,
            activation=onnx_block.activation, hidden_tensor=onnx_block.hidden, output_tensor=onnx_block.second.output,
            torch_first=block.first, torch_second=block.second,
            up=None if onnx_block.up is None else onnx_block.up.name, form=onnx_block.form, notes=onnx_block.notes,
        )))
    return record.evolve(blocks=tuple(row for _, row in sorted(rows, key=lambda r: r[0])), format="dense", source="torch")


class _KeywordInputs(nn.Module):
    """Calls ``model(**dict(zip(names, inputs)))`` and returns its tensor outputs as a tuple: the
    TorchScript exporter passes inputs by position, which Hugging Face forwards do not take reliably,
    and their ``ModelOutput`` is a dict."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, inputs)))
        values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else (out,)
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
    input_names: Sequence[str] = ("x",),
    output_names: Sequence[str] = ("y",),
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) to ``path`` and return the written ModelProto.

    Masks are applied first (and kept weights that training drove to exactly 0.0 get the smallest
    normal value), so each masked layer exports exactly its mask's nonzero count. The module's
    training flag is restored afterwards. A ``fpe_expand(..., structured=True)`` model is written in
    the ``grouped`` format, as ``neurorewrite expand --structured`` writes it (dense speed, W2 stored
    once).

    ``example_input`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs (Hugging
    Face models: ``{"input_ids": ids, "attention_mask": mask}``); with a dict the graph inputs take its
    keys as names (unless ``input_names`` says otherwise) and the graph outputs are the tensors the
    forward returns, in order (a ``ModelOutput``'s fields that are not None).
    """
    target: nn.Module = model
    if isinstance(example_input, dict):
        if tuple(input_names) == ("x",):
            input_names = tuple(example_input)
        target, args = _KeywordInputs(model, tuple(example_input)), tuple(example_input.values())
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    for layer in masked_layers(model):
        layer.apply_mask()
        layer.restore_support()
    model.eval()
    record = getattr(model, "fpe_record", None)
    structured = isinstance(record, FPERecord) and record.structured
    try:
        if structured:
            target = _KeywordInputs(untied(model), target.names) if isinstance(target, _KeywordInputs) else untied(model)
        proto = _to_proto(target, args, input_names, output_names, opset, dynamic_batch)
    finally:
        model.train(was_training)
    if isinstance(record, FPERecord):
        exported = onnx_record(proto, record, model)
        write_record(proto, exported)
        if structured:
            proto = lower_blocks(proto, "grouped", exported)[0]
    save_model(proto, Path(path))
    return proto
