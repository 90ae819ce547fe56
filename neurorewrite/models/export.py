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

import onnx
import torch
from torch import nn

from neurorewrite.errors import VerificationError
from neurorewrite.models.fpe import masked_layers
from neurorewrite.models.fpe_structured import untied
from neurorewrite.rewriter.blocks import find_blocks
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


def onnx_record(proto: onnx.ModelProto, record: FPERecord) -> FPERecord:
    """The record of a torch expansion for its exported graph: the torch blocks matched to the ONNX
    blocks (same order), named as ``neurorewrite expand`` names them, with the module paths kept in
    ``torch_first``/``torch_second``."""
    found = find_blocks(proto).blocks
    if len(found) < len(record.blocks):
        raise VerificationError(
            f"the exported graph has {len(found)} MLP blocks but fpe_expand expanded {len(record.blocks)}; "
            "is the forward pass using every expanded module?"
        )
    rows = tuple(
        replace(
            block, name=onnx_block.name, first=onnx_block.first.name, second=onnx_block.second.name,
            activation=onnx_block.activation, hidden_tensor=onnx_block.hidden, output_tensor=onnx_block.second.output,
            torch_first=block.first, torch_second=block.second,
        )
        for block, onnx_block in zip(record.blocks, found)
    )
    return record.evolve(blocks=rows, format="dense", source="torch")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
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
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    for layer in masked_layers(model):
        layer.apply_mask()
        layer.restore_support()
    model.eval()
    record = getattr(model, "fpe_record", None)
    structured = isinstance(record, FPERecord) and record.structured
    try:
        proto = _to_proto(untied(model) if structured else model, args, input_names, output_names, opset, dynamic_batch)
    finally:
        model.train(was_training)
    if isinstance(record, FPERecord):
        exported = onnx_record(proto, record)
        write_record(proto, exported)
        if structured:
            proto = lower_blocks(proto, "grouped", exported)[0]
    save_model(proto, Path(path))
    return proto
