"""Checkpoints of FPE-expanded torch modules: save the expanded state, rebuild it without re-expanding.

An expanded module's widths differ from the dense model's, so its ``state_dict`` does not load into
the dense architecture, and re-running :func:`~neurorewrite.models.fpe.fpe_expand` to get the shapes
would recompute the split and the prune (costly, and the pruning of a trained model gives other
masks). The pair here avoids both:

- :func:`fpe_state_dict` returns ``{"format", "record", "state_dict"}``: the FPE record (options and
  blocks, ``groups`` included) and the module's ``state_dict``, whose ``weight_mask``/``bias_mask``
  buffers are the masks;
- :func:`load_fpe_state_dict` takes the dense architecture as a template (the same class the model was
  expanded from, with any weights), replaces each expanded linear named in the record by a
  :class:`~neurorewrite.models.fpe.MaskedLinear` (or :class:`~neurorewrite.models.fpe_structured.TiedLinear`)
  of the checkpoint's shape, and loads the checkpoint strictly. The result holds exactly the saved
  weights and masks and ``fpe_record``; nothing is recomputed, the template is not changed.

With the optimizer's ``state_dict`` saved beside it, a resumed fine-tune equals an uninterrupted one
exactly (``tests/models/test_checkpoints.py``). DDP wrappers are unwrapped, so keys have no
``module.`` prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models.distributed import unwrap
from neurorewrite.models.fpe import MaskedLinear
from neurorewrite.models.fpe_structured import TiedLinear
from neurorewrite.rewriter.record import FPERecord

__all__ = ["fpe_state_dict", "load_fpe_state_dict", "record_from_dict", "record_to_dict"]

FORMAT = 1


def record_to_dict(record: FPERecord) -> dict[str, Any]:
    """The whole record as plain data: the ONNX metadata form (:meth:`FPERecord.to_json`) plus the
    ``groups`` of a ``groups`` split, which that form leaves out."""
    groups = record.config.groups
    return {**record.to_json(), "groups": None if groups is None else [list(g) for g in groups]}


def record_from_dict(data: Mapping[str, Any]) -> FPERecord:
    """The inverse of :func:`record_to_dict`."""
    record = FPERecord.from_json(dict(data), "the FPE checkpoint")
    groups = data.get("groups")
    if groups is None:
        return record
    return record.evolve(config=replace(record.config, groups=tuple(tuple(int(i) for i in g) for g in groups)))


def fpe_state_dict(model: nn.Module) -> dict[str, Any]:
    """The checkpoint of an expanded module (see the module docstring); tensors are the live ones,
    as in ``state_dict`` (``torch.save`` copies them)."""
    inner = unwrap(model)
    record = getattr(inner, "fpe_record", None)
    if not isinstance(record, FPERecord):
        raise InvalidOptionError(
            f"{type(inner).__name__} has no fpe_record: fpe_state_dict saves modules made by fpe_expand"
            " (or restored by load_fpe_state_dict)"
        )
    return {"format": FORMAT, "record": record_to_dict(record), "state_dict": inner.state_dict()}


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _masked_like(state: Mapping[str, torch.Tensor], prefix: str, where: str) -> MaskedLinear:
    weight = state.get(prefix + "weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InvalidOptionError(f"the FPE checkpoint has no 2-D {prefix}weight for the expanded layer {where!r}")
    out_features, in_features = weight.shape
    return MaskedLinear(in_features, out_features, bias=prefix + "bias" in state, dtype=weight.dtype)


def load_fpe_state_dict(template: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """A new expanded module: ``template``'s architecture with the checkpoint's expanded layers, weights,
    masks and record (see the module docstring). ``template`` is not changed."""
    if checkpoint.get("format") != FORMAT or "record" not in checkpoint or "state_dict" not in checkpoint:
        raise InvalidOptionError("not an FPE checkpoint: expected the dict fpe_state_dict returns")
    record = record_from_dict(checkpoint["record"])
    state: Mapping[str, torch.Tensor] = checkpoint["state_dict"]
    model = copy.deepcopy(unwrap(template))
    paths = list(dict.fromkeys(path for block in record.blocks for path in (block.first, block.up, block.second) if path))
    for path in paths:
        try:
            old = model.get_submodule(path)
        except AttributeError as error:
            raise InvalidOptionError(f"the template has no submodule {path!r} that the FPE record expanded") from error
        if not isinstance(old, nn.Linear):
            raise InvalidOptionError(f"the template's {path!r} is a {type(old).__name__}, not the Linear FPE expanded")
        tied = path + ".linear.weight" in state
        layer: nn.Module = _masked_like(state, f"{path}.linear." if tied else f"{path}.", path)
        if tied:
            layer = TiedLinear(layer, record.config.alpha)  # type: ignore[arg-type]
        _set_module(model, path, layer.to(old.weight.device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())  # torch's message spans lines; ours is one
        template_name = type(model).__name__
        raise InvalidOptionError(f"the FPE checkpoint does not fit the template {template_name}: {detail}") from error
    model.fpe_record = record
    return model
