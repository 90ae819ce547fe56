"""The ``structured=True`` FPE variant on torch modules: the tied outgoing layer and its options.

The structured block is ``y = W2 @ sum_k act(W1'_k x + b1/alpha) + b2``: W1' comes from the numpy core
with the ``shared`` split (one input partition for all neurons, so W1' is ``alpha`` dense blocks) and
``prune="layer"``; the ``alpha`` children of a parent share the parent's ORIGINAL outgoing column
(tied). :class:`TiedLinear` is that last layer: a sum over each parent's children, then the original
linear. It is what :mod:`neurorewrite.passes.tie_outputs` writes on the ONNX side, and, like
that pass, only the last linear of a chain is tied (chain middles keep their FPE weights).

Counting: ``nnz(W1') + nnz(b1') + nnz(W2) + nnz(b2)`` equals the original block's count, because
``prune="layer"`` removes exactly the hidden-bias excess from W1' and W2 is stored once.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from neurorewrite.fpe import FPEConfig, structured_split


class TiedLinear(nn.Module):
    """``linear(h.view(..., H, alpha).sum(-1))``: children ``i*alpha .. i*alpha+alpha-1`` of parent ``i``
    share ``linear``'s column ``i``. Training updates the one shared column with the children's summed
    gradient.

    ``export_onnx`` writes it through :func:`untied` and then lowers the model to the ``grouped``
    format, which stores W2 once again (see there).
    """

    def __init__(self, linear: nn.Linear, alpha: int) -> None:
        super().__init__()
        self.linear = linear
        self.alpha = alpha

    @property
    def in_features(self) -> int:
        return self.linear.in_features * self.alpha

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.unflatten(-1, (self.linear.in_features, self.alpha)).sum(-1))

    def untied(self) -> nn.Linear:
        """The same function as one plain linear whose column ``i`` is repeated for every child."""
        w = self.linear.weight.detach().repeat_interleave(self.alpha, dim=1)
        out = nn.Linear(w.shape[1], w.shape[0], bias=self.linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.linear.bias is not None:
                out.bias.copy_(self.linear.bias)
        return out

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def untied(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`TiedLinear` replaced by its :meth:`TiedLinear.untied` linear:
    the dense form of the structured model, as ``neurorewrite expand --structured`` has it between
    its tie and lower passes (so the ONNX block finder sees ordinary Linear -> act -> Linear pairs)."""
    if isinstance(model, TiedLinear):
        return model.untied()
    out = copy.deepcopy(model)
    for path, module in list(out.named_modules()):
        if isinstance(module, TiedLinear):
            parent, _, name = path.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, name, module.untied())
    return out


def structured_config(config: FPEConfig) -> FPEConfig:
    """The preset's options, as ``neurorewrite expand --structured`` sets them: one input partition for
    all neurons (:func:`neurorewrite.fpe.structured_split`) and ``prune="layer"``."""
    split = structured_split(config.split, "fpe_expand(structured=True)")
    return replace(config, split=split, prune="layer", groups=None)
