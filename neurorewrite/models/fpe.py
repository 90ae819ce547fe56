"""FPE on torch modules: masked linear layers and ``fpe_expand``.

``fpe_expand`` finds the MLP blocks of a module on the data flow of its forward (plain
``linear -> activation -> linear`` pairs and gated ``down(act(gate(x)) * up(x))`` triples, anywhere
in the module tree: :mod:`neurorewrite.models.module_blocks`), expands each with the numpy core
(:func:`neurorewrite.fpe.expand_block`, :func:`neurorewrite.fpe.expand_gated_block`) and returns a NEW
module whose expanded layers are :class:`MaskedLinear`. It mirrors :mod:`neurorewrite.passes.expand_blocks`
exactly: block ``k`` uses ``block_seed(seed, k)``, and in a chain ``L1 -> act -> L2 -> act -> L3`` the
second block splits the already widened ``L2``. So exporting ``fpe_expand(model)`` gives the same weights
and masks as ``neurorewrite expand`` on the exported dense model.

Masks are fixed: a :class:`MaskedLinear` keeps its pruned weights at exactly zero as long as every
optimizer step goes through :func:`enforce_masks` (gradients are masked as autograd computes them and
again before the step, weights after it, so neither momentum, weight decay, gradient clipping nor an
optimizer that mixes entries can revive a pruned weight or steer the kept ones by it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from neurorewrite.errors import NoBlocksError
from neurorewrite.fpe import FPEConfig, block_seed, check_alpha, expand_block, expand_gated_block, join_fused, split_fused
from neurorewrite.models.fpe_structured import TiedLinear, structured_config
from neurorewrite.models.module_blocks import ModuleSearch, SkippedModule, find_module_blocks
from neurorewrite.models.onnx_ops_tensor import tensor_of
from neurorewrite.models.trace_ops import is_conv1d, trace_ops
from neurorewrite.rewriter.record import BlockRecord, FPERecord


class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` with fixed boolean masks (buffers ``weight_mask``, ``bias_mask``).

    The forward pass is the plain linear, so it exports as one Gemm. The masks hold the support
    (the nonzero pattern at expansion time); :func:`enforce_masks` keeps everything outside it zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.register_buffer("weight_mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.register_buffer("bias_mask", torch.ones(out_features, dtype=torch.bool, device=device) if bias else None)

    @classmethod
    def from_arrays(cls, w: np.ndarray, b: np.ndarray | None) -> MaskedLinear:
        """A layer holding ``w`` (out, in) and ``b``, masked to their nonzero entries."""
        weight = tensor_of(w)  # a copy: the caller's array may be read-only or reused; bfloat16 as float32
        # no random initialisation to overwrite, and the copy itself becomes the parameter: one weight-sized
        # allocation, not two (a 2 GiB layer)
        layer = nn.utils.skip_init(cls, w.shape[1], w.shape[0], bias=b is not None, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight = nn.Parameter(weight)
            layer.weight_mask.copy_(weight != 0)
            if b is not None:
                layer.bias.copy_(tensor_of(b))
                layer.bias_mask.copy_(layer.bias != 0)
        return layer

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the weights (and bias entries) outside the masks."""
        self.weight.mul_(self.weight_mask)
        if self.bias is not None and self.bias_mask is not None:
            self.bias.mul_(self.bias_mask)

    def mask_grad(self) -> None:
        """Zero the gradients outside the masks."""
        if self.weight.grad is not None:
            self.weight.grad.mul_(self.weight_mask)
        if self.bias is not None and self.bias.grad is not None and self.bias_mask is not None:
            self.bias.grad.mul_(self.bias_mask)

    @torch.no_grad()
    def restore_support(self) -> None:
        """Give any kept weight that training drove to exactly 0.0 the smallest normal value, so the
        nonzero count equals the mask count (0.0 is a measure-zero accident, but counts are exact)."""
        for value, mask in ((self.weight, self.weight_mask), (self.bias, self.bias_mask)):
            if value is not None and mask is not None:
                value[mask & (value == 0)] = torch.finfo(value.dtype).tiny

    def nonzeros(self) -> int:
        """Nonzero weights plus nonzero bias entries: the count FPE keeps exact."""
        count = int(torch.count_nonzero(self.weight))
        return count + (0 if self.bias is None else int(torch.count_nonzero(self.bias)))

    def extra_repr(self) -> str:
        kept = int(self.weight_mask.sum())
        return f"{super().extra_repr()}, kept={kept}/{self.weight_mask.numel()}"


def masked_layers(module: nn.Module) -> Iterator[MaskedLinear]:
    """Every :class:`MaskedLinear` inside ``module`` (itself included), in module order."""
    return (m for m in module.modules() if isinstance(m, MaskedLinear))


def apply_masks(module: nn.Module) -> None:
    """Zero every weight outside its mask, in place, for every MaskedLinear of ``module``."""
    for layer in masked_layers(module):
        layer.apply_mask()


def enforce_masks(optimizer: torch.optim.Optimizer, module: nn.Module) -> tuple[RemovableHandle, ...]:
    """Make ``optimizer`` keep the masks of ``module``, so that it trains the sparse model: the kept
    weights move as if the pruned ones did not exist, and the pruned ones stay exactly zero.

    Gradients are masked as autograd computes them (tensor hooks), so whatever reads them before the
    step sees only kept entries: gradient clipping across parameters, a closure that recomputes them
    inside the step (LBFGS), optimizers that mix entries (Adafactor's factored moments). They are masked
    again before each step (gradients written by hand) and the weights after it (weight decay, momentum).
    Works with any torch optimizer; remove the returned handles to stop.
    """
    layers = list(masked_layers(module))

    def before(*_: object) -> None:
        for layer in layers:
            layer.mask_grad()

    def after(*_: object) -> None:
        for layer in layers:
            layer.apply_mask()

    handles = []
    for layer in layers:
        # a frozen layer gets no gradient to mask (the step hooks still keep its weights masked)
        if not layer.weight.requires_grad:
            continue
        # read the buffers when the hook runs: ``module.to(device)`` replaces them
        handles.append(layer.weight.register_hook(lambda g, layer=layer: g * layer.weight_mask))
        if layer.bias is not None and layer.bias_mask is not None and layer.bias.requires_grad:
            handles.append(layer.bias.register_hook(lambda g, layer=layer: g * layer.bias_mask))
    return (*handles, optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after))


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def linear_arrays(layer: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    """Copies of ``layer``'s weight (out, in) and bias as numpy arrays (bias None when it has none);
    ``layer`` is an ``nn.Linear`` or Hugging Face's ``Conv1D`` (weight stored (in, out)). bfloat16,
    which numpy lacks, comes as float32 (exactly)."""

    def array(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()

    w = array(layer.weight.T if is_conv1d(layer) else layer.weight)
    return w, None if layer.bias is None else array(layer.bias)


@dataclass(frozen=True)
class Widened:
    """A module whose width changed: ``side`` is ``outputs`` (gate/up/first) or ``inputs`` (second/down)."""

    module: str
    side: str
    before: int
    after: int


@dataclass
class ModuleExpandReport:
    """What ``fpe_expand`` did (``model.fpe_report``): the tracer it followed the data flow with, one
    row per expanded block (as in ``model.fpe_record``; a gated row names its ``up`` module), the near
    misses with their reasons, and every widened module. Config fields such as ``intermediate_size`` are NOT
    changed: the forward reads the widths from the modules, so inference and ``generate`` work, but
    a config saved from the expanded model describes the dense one."""

    tracer: str
    blocks: list[BlockRecord] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    widened: list[Widened] = field(default_factory=list)


def find_blocks_in_module(model: nn.Module, example_inputs: Any = None) -> ModuleSearch:
    """The MLP blocks ``fpe_expand`` would expand and the near misses, without changing anything."""
    return find_module_blocks(model, trace_ops(model, example_inputs))


def fpe_expand(
    model: nn.Module,
    alpha: int = 4,
    split: str = "random",
    seed: int = 0,
    bias: str = "split",
    prune: str = "global",
    groups: tuple[tuple[int, ...], ...] | list[list[int]] | None = None,
    config: FPEConfig | None = None,
    structured: bool = False,
    example_inputs: Any = None,
    lead_share: float | None = None,
) -> nn.Module:
    """A new module in which every MLP block of ``model`` is FPE-expanded (``model`` is unchanged).

    Blocks are found on the data flow of ``model``'s forward (:mod:`neurorewrite.models.module_blocks`):
    ``linear -> elementwise activation -> linear`` pairs and gated ``down(act(gate(x)) * up(x))``
    triples anywhere in the module tree (``nn.Linear`` or Hugging Face ``Conv1D``). torch.fx traces
    the forward where it can; otherwise (Hugging Face models) pass ``example_inputs`` (a tensor, a
    tuple of positional inputs or a dict of keyword inputs) and torch.export traces one run.

    Options are those of :class:`neurorewrite.fpe.FPEConfig` (pass ``config`` instead to give them all
    at once); ``alpha`` must be at least 2. ``split="tiered"`` ranks each neuron's inputs by ``|W1|``
    alone (no sample here), as ``neurorewrite expand --split tiered`` does without one; it keeps a
    pretrained model closest (``docs/methods.md`` 1.3c). ``lead_share`` (tiered only) gives each neuron's
    first child that share of its inputs, the largest, as ``--lead-share`` does (None: balanced tiers).
    Block ``k`` (execution order of its first linear) uses ``block_seed(seed, k)`` like ``neurorewrite
    expand``; the expanded linears become :class:`MaskedLinear` (``Conv1D`` too, as a plain linear), set in
    place on their parents in a deep copy, so the model's class, config, ``forward`` and ``generate`` keep working.
    ``result.fpe_record`` is the :class:`~neurorewrite.rewriter.record.FPERecord`
    ``neurorewrite expand`` writes (module paths for layer names, ``source="torch"``);
    ``result.fpe_report`` (:class:`ModuleExpandReport`) adds the tracer, the near misses with their
    reasons and the widened modules.

    ``structured=True`` is the preset of ``neurorewrite expand --structured``
    (:mod:`neurorewrite.models.fpe_structured`): ``blocks`` split (or ``shared``/``feature``),
    ``prune="layer"``, and the last linear of every chain (a gated block's down) becomes a
    :class:`TiedLinear` holding the ORIGINAL weights, fed with the sum of each parent's children.
    """
    if config is None:
        config = FPEConfig(
            alpha=check_alpha(alpha, minimum=2), split=split, seed=int(seed), bias=bias, prune=prune,
            groups=None if groups is None else tuple(tuple(int(i) for i in g) for g in groups),
            lead_share=lead_share,
        )
    else:
        check_alpha(config.alpha, minimum=2)
    if structured:
        config = structured_config(config)
    search = find_blocks_in_module(model, example_inputs)
    if not search.blocks:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in search.skipped[:5])
        raise NoBlocksError(
            f"{type(model).__name__}: no Linear -> activation -> Linear pair to expand "
            f"(fpe_expand follows the forward's data flow, traced with {search.tracer}, for linear layers "
            "joined by elementwise activations, or gated act(gate(x)) * up(x) -> down"
            + (f"; near misses: {detail})" if detail else ")")
        )
    new = copy.deepcopy(model)
    current, report = _expand_blocks(new, search, config)
    tied = {b.second for b in search.blocks} - {p for b in search.blocks for p in b.inputs} if structured else set()
    for path, (w, b) in current.items():
        old = new.get_submodule(path)
        if path in tied:  # the original W2 / Wd, shared by each parent's children
            w, b = linear_arrays(old)
        layer: nn.Module = MaskedLinear.from_arrays(w, b).to(old.weight.device, old.weight.dtype)
        if path in tied:
            layer = TiedLinear(layer, config.alpha)
        layer.train(old.training)
        _set_module(new, path, layer)
    new.fpe_record = FPERecord(config, tuple(report.blocks), structured=structured, source="torch")
    new.fpe_report = report
    return new


def _expand_blocks(
    model: nn.Module, search: ModuleSearch, config: FPEConfig
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], ModuleExpandReport]:
    """Expand the blocks in order; a chain's later block splits the already widened middle linear."""
    current: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    report = ModuleExpandReport(search.tracer, skipped=list(search.skipped))

    def arrays(path: str) -> tuple[np.ndarray, np.ndarray | None]:
        return current[path] if path in current else linear_arrays(model.get_submodule(path))

    for position, block in enumerate(search.blocks):
        cfg = replace(config, seed=block_seed(config.seed, position))
        (w1, b1), (w2, b2) = arrays(block.first), arrays(block.second)
        width_before = w1.shape[0]
        if not block.gated:
            exp = expand_block(w1, b1, w2, b2, cfg)
            current[block.first], current[block.second] = (exp.w1, exp.b1), (exp.w2, exp.b2)
            width_after, before, after = exp.w1.shape[0], exp.nnz_before, exp.nnz_after
        else:
            if block.gate_half is not None:  # gate and up fused: the halves of one linear (chunk(2))
                (wg, bg), (wu, bu) = split_fused(w1, b1, block.gate_half)
            else:
                (wg, bg), (wu, bu) = (w1, b1), arrays(block.up)  # type: ignore[arg-type]
            gated = expand_gated_block(wg, bg, wu, bu, w2, b2, cfg)
            if block.gate_half is not None:
                current[block.first] = join_fused((gated.wg, gated.bg), (gated.wu, gated.bu), block.gate_half)
            else:
                current[block.first], current[block.up] = (gated.wg, gated.bg), (gated.wu, gated.bu)  # type: ignore[index]
            current[block.second] = (gated.wd, gated.bd)
            width_before, width_after, before, after = wg.shape[0], gated.wg.shape[0], gated.nnz_before, gated.nnz_after
        report.blocks.append(BlockRecord(
            name=block.first, first=block.first, second=block.second, activation=block.activation,
            in_features=w1.shape[1], width_before=width_before, width_after=width_after, out_features=w2.shape[0],
            nnz_before=before, nnz_after=after, up=block.up, form=block.form,
        ))
    for path, (w, _) in current.items():
        before = linear_arrays(model.get_submodule(path))[0].shape
        report.widened += [
            Widened(path, side, before[axis], w.shape[axis])
            for side, axis in (("outputs", 0), ("inputs", 1)) if w.shape[axis] != before[axis]
        ]
    return current, report
