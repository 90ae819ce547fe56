"""FPE on torch modules: masked linear layers and ``fpe_expand``.

``fpe_expand`` finds the ``Linear -> activation -> Linear`` pairs of a module (inside every
``nn.Sequential``, in module order), expands each with the numpy core :func:`neurorewrite.fpe.expand_block`
and returns a NEW module whose expanded layers are :class:`MaskedLinear`. It mirrors
:mod:`neurorewrite.passes.expand_blocks` exactly: block ``k`` uses ``block_seed(seed, k)``, and in a chain
``L1 -> act -> L2 -> act -> L3`` the second block splits the already widened ``L2``. So exporting
``fpe_expand(model)`` gives the same weights and masks as ``neurorewrite expand`` on the exported
dense model.

Masks are fixed: a :class:`MaskedLinear` keeps its pruned weights at exactly zero as long as every
optimizer step goes through :func:`enforce_masks` (gradients are masked as autograd computes them and
again before the step, weights after it, so neither momentum, weight decay, gradient clipping nor an
optimizer that mixes entries can revive a pruned weight or steer the kept ones by it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from neurorewrite.errors import NoBlocksError
from neurorewrite.fpe import FPEConfig, block_seed, check_alpha, expand_block
from neurorewrite.models.fpe_structured import TiedLinear, chain_ends, structured_config
from neurorewrite.rewriter.record import BlockRecord, FPERecord

# Modules that act per element, so widening the hidden layer is safe (as ``rewriter.blocks`` allows
# for ONNX). Dropout is the identity in the exported (eval) graph. PReLU is left out: its slopes are
# per hidden unit, so widening the layer would need new slopes.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Tanhshrink, nn.Identity, nn.Dropout,
)


class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` with fixed boolean masks (buffers ``weight_mask``, ``bias_mask``).

    The forward pass is the plain linear, so it exports as one Gemm. The masks hold the support
    (the nonzero pattern at expansion time); :func:`enforce_masks` keeps everything outside it zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.register_buffer("weight_mask", torch.ones(out_features, in_features, dtype=torch.bool))
        self.register_buffer("bias_mask", torch.ones(out_features, dtype=torch.bool) if bias else None)

    @classmethod
    def from_arrays(cls, w: np.ndarray, b: np.ndarray | None) -> MaskedLinear:
        """A layer holding ``w`` (out, in) and ``b``, masked to their nonzero entries."""
        weight = torch.from_numpy(np.array(w))  # a copy: the caller's array may be read-only or reused
        layer = cls(w.shape[1], w.shape[0], bias=b is not None, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.weight_mask.copy_(weight != 0)
            if b is not None:
                layer.bias.copy_(torch.from_numpy(np.array(b)))
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
        # read the buffers when the hook runs: ``module.to(device)`` replaces them
        handles.append(layer.weight.register_hook(lambda g, layer=layer: g * layer.weight_mask))
        if layer.bias is not None and layer.bias_mask is not None:
            handles.append(layer.bias.register_hook(lambda g, layer=layer: g * layer.bias_mask))
    return (*handles, optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after))


def find_pairs(module: nn.Module) -> list[tuple[str, str, str]]:
    """``(first, second, activation)`` module paths of every Linear -> elementwise* -> Linear pair
    inside an ``nn.Sequential``, in module order. Chains give overlapping pairs."""
    pairs = []
    for prefix, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        last: str | None = None
        acts: list[str] = []
        for name, child in seq.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear):
                if last is not None:
                    pairs.append((last, path, "+".join(acts) or "Identity"))
                last, acts = path, []
            elif isinstance(child, ELEMENTWISE) and last is not None:
                if not isinstance(child, (nn.Identity, nn.Dropout)):
                    acts.append(type(child).__name__)
            else:
                last, acts = None, []
    return pairs


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def linear_arrays(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray | None]:
    """Copies of ``layer``'s weight (out, in) and bias as numpy arrays (bias None when it has none)."""
    w = layer.weight.detach().cpu().numpy().copy()
    b = None if layer.bias is None else layer.bias.detach().cpu().numpy().copy()
    return w, b


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
) -> nn.Module:
    """A new module in which every Linear pair of ``model`` is FPE-expanded (``model`` is unchanged).

    Options are those of :class:`neurorewrite.fpe.FPEConfig` (pass ``config`` instead to give them
    all at once); ``alpha`` must be at least 2. The expanded linears become :class:`MaskedLinear`;
    ``result.fpe_record`` (the :class:`~neurorewrite.rewriter.record.FPERecord` ``neurorewrite expand``
    writes, with module paths for layer names and ``source="torch"``) lists the blocks.

    ``structured=True`` is the preset of ``neurorewrite expand --structured``
    (:mod:`neurorewrite.models.fpe_structured`): ``shared`` split (or ``feature``), ``prune="layer"``,
    and the last linear of every chain becomes a :class:`TiedLinear` holding the ORIGINAL weights
    (a :class:`MaskedLinear`, so its zeros stay zero), fed with the sum of each parent's children.
    """
    if config is None:
        config = FPEConfig(
            alpha=check_alpha(alpha, minimum=2), split=split, seed=int(seed), bias=bias, prune=prune,
            groups=None if groups is None else tuple(tuple(int(i) for i in g) for g in groups),
        )
    else:
        check_alpha(config.alpha, minimum=2)
    if structured:
        config = structured_config(config)
    pairs = find_pairs(model)
    if not pairs:
        raise NoBlocksError(
            f"{type(model).__name__}: no Linear -> activation -> Linear pair to expand "
            "(fpe_expand looks inside nn.Sequential containers for consecutive Linear layers "
            "separated only by elementwise activations)"
        )
    new = copy.deepcopy(model)
    current: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    blocks: list[BlockRecord] = []
    for position, (first, second, activation) in enumerate(pairs):
        w1, b1 = current.get(first) or linear_arrays(new.get_submodule(first))
        w2, b2 = current.get(second) or linear_arrays(new.get_submodule(second))
        exp = expand_block(w1, b1, w2, b2, replace(config, seed=block_seed(config.seed, position)))
        current[first] = (exp.w1, exp.b1)
        current[second] = (exp.w2, exp.b2)
        blocks.append(BlockRecord(
            name=first, first=first, second=second, activation=activation, in_features=w1.shape[1],
            width_before=w1.shape[0], width_after=exp.w1.shape[0], out_features=w2.shape[0],
            nnz_before=exp.nnz_before, nnz_after=exp.nnz_after,
        ))
    tied = chain_ends(pairs) if structured else set()
    for path, (w, b) in current.items():
        old = new.get_submodule(path)
        if path in tied:  # the original W2, shared by each parent's children
            w, b = linear_arrays(old)
        layer: nn.Module = MaskedLinear.from_arrays(w, b).to(old.weight.device)
        if path in tied:
            layer = TiedLinear(layer, config.alpha)
        layer.train(old.training)
        _set_module(new, path, layer)
    new.fpe_record = FPERecord(config, tuple(blocks), structured=structured, source="torch")
    return new
