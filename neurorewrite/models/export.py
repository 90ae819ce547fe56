"""Export torch models (FPE-expanded or not) to ONNX files the rewriter and runtimes accept.

``export_onnx`` runs the TorchScript exporter (``dynamo=False``: fast, and an ``nn.Linear`` becomes
one Gemm whose initializer is the weight as stored), makes every masked layer hold exactly its mask's
nonzero count, writes the FPE record of ``fpe_expand`` into ``metadata_props`` in the form
``neurorewrite expand`` uses, and saves atomically.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import onnx
import torch
from torch import nn

from neurorewrite.errors import VerificationError
from neurorewrite.models.fpe import FPERecord, masked_layers
from neurorewrite.models.fpe_structured import untied
from neurorewrite.passes.expand import BlockReport
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.edit import write_metadata
from neurorewrite.rewriter.io import save_model


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


def fpe_metadata(proto: onnx.ModelProto, record: FPERecord) -> dict[str, object]:
    """The ``neurorewrite.fpe`` record for an exported model: the torch blocks matched to the ONNX
    blocks (same order). Each row is the :class:`BlockReport` ``neurorewrite expand`` writes (ONNX
    names, the torch side's counts) plus the torch module paths."""
    found = find_blocks(proto).blocks
    if len(found) < len(record.blocks):
        raise VerificationError(
            f"the exported graph has {len(found)} MLP blocks but fpe_expand expanded {len(record.blocks)}; "
            "is the forward pass using every expanded Sequential?"
        )
    rows = []
    for block, onnx_block in zip(record.blocks, found):
        row = BlockReport(
            name=onnx_block.name, first=onnx_block.first.name, second=onnx_block.second.name,
            activation=onnx_block.activation, in_features=block.in_features, width_before=block.width_before,
            width_after=block.width_after, out_features=block.out_features, nnz_before=block.nnz_before,
            nnz_after=block.nnz_after, hidden_tensor=onnx_block.hidden, output_tensor=onnx_block.second.output,
        )
        rows.append({**asdict(row), "torch_first": block.first, "torch_second": block.second})
    return {**record.to_dict(), "format": "dense", "blocks": rows, "source": "torch"}


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
        write_metadata(proto, fpe_metadata(proto, record))
    if structured:
        from neurorewrite.passes.lower import lower_model

        proto = lower_model(proto, "grouped")[0]
    save_model(proto, Path(path))
    return proto
