"""MEmeL: inhibit monosemantic activation elements during training (METHODS.md section 2).

:class:`MEmeL` is a parameter-free module applied to an activation ``z`` of shape
``(batch, *features)``. In train mode, for each batch it

1. scores every element with the Monosemantic Scale
   ``phi = (z - mu)^2 / (s^2 + 0.01 * mean(s^2))``, where ``mu`` and ``s^2`` (unbiased) are the
   running per-element statistics from the *previous* batches (the paper's "historical" mean),
   ``mean(s^2)`` being taken over all elements of the activation;
2. selects, per sample, the ``top_t`` elements of ``phi`` over the flattened activation;
3. applies Reversed Deactivation to the selected elements,
   ``z' = -D*z + (mu + D*z).detach()``: the forward value is ``mu``, the gradient is ``-D`` times the
   upstream gradient. ``delta`` (D) = 1 is RD; 0 and -1 are the paper's two naive variants (no
   gradient, and straight-through). :func:`reversed_deactivation` computes it with a small autograd
   function: same value and gradient as the formula, but the forward value is exactly ``mu`` and
   it costs one copy forward and one backward;
4. merges the batch into the running statistics with the *pre-inhibition* values ``z``
   (see :mod:`neurorewrite.models.memel_stats`: Chan merge, count capped at ``n_forget`` batches).

Late start: the first ``n_forget`` training batches only feed the statistics; inhibition begins
with batch ``n_forget + 1``. In eval mode the module returns its input unchanged and updates nothing.
With ``torch.distributed`` initialised (and ``sync_ranks=True``) the batch moments are summed over
all ranks, so ranks on shards of a batch keep the same statistics and make the same selections as
one process on the whole batch. The statistics ``mean`` and ``m2`` are buffers, created lazily from
the first activation's shape; the sample ``count`` and ``batches_seen`` are Python ints kept in the
``state_dict`` as the module's extra state (no tensor op, no device sync per step); ``load_state_dict`` into a
fresh module works.

Design choice for :func:`insert_memel`: a forward hook on the named submodule, not a wrapper. The
module tree, parameter names and ``state_dict`` keys of the model stay exactly as they were, an
exported model (export runs in eval mode, where the hook does nothing) has the same graph and node
names as the plain model, and :func:`remove_memel` only deletes hooks. The hook follows the hooked
module's train/eval flag. The price: the MEmeL statistics live outside the model's ``state_dict``
(get the modules with :func:`find_memel`); a checkpoint carries them with one call beside it,
:func:`neurorewrite.models.memel_checkpoint.memel_state_dict` (and ``load_memel_state_dict`` to
resume without a second warm-up). Under ``DistributedDataParallel`` the MEmeL statistics are not
model buffers, so DDP does not broadcast them; they stay equal across ranks because every rank
merges the same all-reduced moments. The hooked submodule must return a tensor, or a tuple/list
whose first item is the tensor (as Hugging Face layers do); the activation's feature shape must stay
fixed between batches.

Cost: on CPU float32 activations (contiguous once flattened) the step runs on a fused C kernel
(:mod:`neurorewrite.models.memel_fused`, built on first use by :mod:`neurorewrite.models.memel_native`):
one pass over the activation for the statistics, the score, the top-1 selection and the output copy,
one C call for the merge, one copy backward. Everywhere else (GPU, bfloat16/float64, no C compiler,
``NEUROREWRITE_MEMEL_KERNEL=0``) the eager torch code below runs: a dozen element-wise passes plus a
few kernels on per-element vectors, in place where it can. Both give the same selections, values
and gradients; the statistics agree to float32 rounding (``tests/models/test_memel_fused.py``).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models.memel_fused import fused_kernel_for, fused_step
from neurorewrite.models.memel_rd import reversed_deactivation
from neurorewrite.checks import finite_number, integer_at_least
from neurorewrite.models.memel_stats import batch_moments, merge_capped_, unbiased_variance

__all__ = ["MEmeL", "find_memel", "first_argmax_", "insert_memel", "remove_memel", "reversed_deactivation"]

VARIANCE_FLOOR_SHARE = 0.01  # the paper's 0.01 * mean(s^2) added to every element's variance




class MEmeL(nn.Module):
    """Monosemantic-element inhibition for one activation; identity in eval mode (see module doc)."""

    mean: Tensor
    m2: Tensor

    def __init__(
        self, top_t: int = 1, delta: float = 1.0, n_forget: int = 10, sync_ranks: bool = True, name: str = "MEmeL"
    ) -> None:
        super().__init__()
        self.top_t = integer_at_least("MEmeL option top_t", top_t, 1)
        self.n_forget = integer_at_least("MEmeL option n_forget", n_forget, 1)
        self.delta = finite_number("MEmeL option delta", delta, hint=" (1 = RD, 0 or -1 = naive)")
        self.sync_ranks = bool(sync_ranks)
        self.name = name
        self.count = 0  # samples the running statistics stand for (capped at n_forget batches)
        self.batches_seen = 0  # training batches seen; inhibition starts when it reaches n_forget
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("m2", torch.zeros(0))
        self._scratch: Tensor | None = None  # not state: a reusable work tensor (see _scratch_like)

    def extra_repr(self) -> str:
        return f"top_t={self.top_t}, delta={self.delta}, n_forget={self.n_forget}, sync_ranks={self.sync_ranks}"

    @property
    def variance(self) -> Tensor:
        """The running unbiased variance ``s^2`` per element (flattened)."""
        return unbiased_variance(self.count, self.m2)

    def _scaled_denominator(self) -> Tensor:
        """``(count - 1) * (s^2 + 0.01 * mean(s^2)) = m2 + 0.01 * mean(m2)`` per element.

        ``phi * (count - 1)`` is ``(z - mu)^2`` over this: the same order within a sample, in three
        kernel launches. It is floored at the dtype's epsilon (per unit of variance): only a layer
        whose every element has been constant so far (a dead layer) gets there, and the floor keeps
        its phi finite.
        """
        floor = torch.finfo(self.m2.dtype).eps * max(self.count - 1.0, 1.0)
        # sum / numel rather than mean(): sum is a kernel this step already ran, so its code is warm.
        share = VARIANCE_FLOOR_SHARE / max(self.m2.numel(), 1)
        return torch.add(self.m2, self.m2.sum(), alpha=share).clamp_min_(floor)

    def monosemantic_scale(self, z: Tensor) -> Tensor:
        """``phi`` of every element of ``z`` (batch x flattened features) against the running statistics."""
        z2d = z.detach().flatten(1).to(self.mean.dtype)
        return (z2d - self.mean).square_().div_(self._scaled_denominator()).mul_(max(self.count - 1.0, 1.0))

    def get_extra_state(self) -> dict[str, int]:
        return {"count": self.count, "batches_seen": self.batches_seen}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.count, self.batches_seen = int(state["count"]), int(state["batches_seen"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The statistics are shaped lazily; take the saved shape so a fresh module can load them.
        for key in ("mean", "m2"):
            saved = state_dict.get(prefix + key)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, key).shape:
                setattr(self, key, torch.zeros(saved.shape, dtype=saved.dtype, device=self.mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z: Tensor) -> Tensor:
        if not self.training:
            return z
        z2d = self._flatten_checked(z)
        inhibit = self.batches_seen >= self.n_forget
        kernel = fused_kernel_for(z2d, self.mean)
        if kernel is not None:  # one C pass instead of the eager code below (memel_fused.py)
            out, batch_count = fused_step(self, kernel, z2d, inhibit)
            # object.__setattr__: what nn.Module.__setattr__ does for an int, minus its checks (per step)
            object.__setattr__(self, "batches_seen", self.batches_seen + int(batch_count > 0))
            return out if out.shape == z.shape else out.view_as(z)
        with torch.no_grad():
            # One centred tensor serves the batch sums and then, squared in place, phi: full-size
            # passes and fresh tensors are most of MEmeL's cost.
            centred = torch.sub(z2d, self.mean, out=self._scratch_like(z2d.shape))
            sum1 = centred.sum(dim=0)
            centred_squared = centred.mul_(centred)
            sum2 = centred_squared.sum(dim=0)
            if inhibit:
                selected = self._select_(centred_squared)
                replacement = torch.take(self.mean, selected)  # the running mean before this batch is merged
                if replacement.dtype != z2d.dtype:
                    replacement = replacement.to(z2d.dtype)
            batch = batch_moments(sum1, sum2, z2d.shape[0], self.sync_ranks)
            self.count = round(merge_capped_(self.count, self.mean, self.m2, batch, self.n_forget))
            self.batches_seen += int(batch[0] > 0)  # the global batch size: the same on every rank
        if not inhibit:
            return z
        out = reversed_deactivation(z2d, selected, replacement, self.delta)
        return out if out.shape == z.shape else out.view_as(z)

    def _flatten_checked(self, z: Tensor) -> Tensor:
        if z.dim() < 2:
            raise InvalidOptionError(
                f"MEmeL after {self.name!r} got an activation of shape {tuple(z.shape)}; it needs (batch, features...):"
                " insert it after a layer whose output has a feature dimension"
            )
        z2d = z if z.dim() == 2 else z.flatten(1)
        features = z2d.shape[1]
        mean = self.mean  # a buffer: each self.mean goes through nn.Module.__getattr__, which this runs per step
        if mean.numel() == features and mean.device == z.device and self.top_t <= features:
            return z2d  # the common case, checked first
        if mean.numel() == 0:
            dtype = torch.promote_types(z.dtype, torch.float32)
            self.mean = torch.zeros(features, dtype=dtype, device=z.device)
            self.m2 = torch.zeros(features, dtype=dtype, device=z.device)
        elif self.mean.numel() != features:
            raise InvalidOptionError(
                f"MEmeL after {self.name!r}: the activation has {features} elements per sample but earlier batches had"
                f" {self.mean.numel()}; MEmeL keeps statistics per element, so the feature shape must stay fixed"
                " (pad sequences to one length, or insert MEmeL after another layer)"
            )
        if self.top_t > features:
            raise InvalidOptionError(
                f"MEmeL option top_t={self.top_t} exceeds the {features} elements per sample after {self.name!r}"
            )
        if self.mean.device != z.device:
            self.to(z.device)
        return z2d

    def _scratch_like(self, shape: torch.Size) -> Tensor:
        """A work tensor of ``shape`` in the statistics' dtype, kept between steps (a fresh one costs page faults)."""
        scratch = self._scratch
        wanted = (shape, self.mean.dtype, self.mean.device)
        if scratch is None or (scratch.shape, scratch.dtype, scratch.device) != wanted:
            scratch = self._scratch = self.mean.new_empty(shape)
        return scratch

    def _select_(self, centred_squared: Tensor) -> Tensor:
        """Indices (batch x top_t) of the elements with the largest phi in each sample; overwrites the input."""
        phi = centred_squared.div_(self._scaled_denominator())  # phi / (count - 1): same selection
        if self.top_t == 1:
            return first_argmax_(phi)
        return phi.topk(self.top_t, dim=1, sorted=False).indices


@functools.lru_cache(maxsize=16)
def _countdown(width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(width, 0, -1, dtype=dtype, device=device)


def first_argmax_(values: Tensor) -> Tensor:
    """Index (rows x 1) of the first maximum of each row of ``values >= 0``, like ``argmax(1, keepdim=True)``.

    Overwrites ``values``. On CPU, ``argmax`` along rows and comparisons into bool tensors are several
    times slower than plain arithmetic and ``amax``, so the first maximum is found with arithmetic:
    ``trunc(v / rowmax)`` is exactly 1 at the maxima and 0 elsewhere (a correctly rounded ``a / b`` with
    ``0 <= a < b`` stays below 1), times a countdown ``width..1``, and ``amax`` again.
    """
    width = values.shape[1]
    at_max = torch.div(values, values.amax(dim=1, keepdim=True), rounding_mode="trunc", out=values)
    score = at_max.mul_(_countdown(width, values.dtype, values.device))
    # A row of zeros gives 0/0 and a NaN row stays NaN: the clamp turns both into index 0, the first.
    return (width - score.amax(dim=1, keepdim=True)).long().clamp_(0, width - 1)


class _MEmeLHook:
    """Forward hook that routes a submodule's output through its MEmeL in train mode."""

    def __init__(self, memel: MEmeL) -> None:
        self.memel = memel

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training:
            return None
        if not self.memel.training:  # follow the hooked module; train() is costly enough to skip
            self.memel.train(True)
        if isinstance(output, Tensor):
            return self.memel(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return type(output)([self.memel(output[0]), *output[1:]])
        raise InvalidOptionError(
            f"MEmeL after {self.memel.name!r}: that submodule returns {type(output).__name__}, not a tensor or a"
            " tuple starting with one; insert MEmeL after a submodule that returns the activation tensor"
        )


def _hooks_of(module: nn.Module) -> list[tuple[int, _MEmeLHook]]:
    return [(key, hook) for key, hook in module._forward_hooks.items() if isinstance(hook, _MEmeLHook)]


def find_memel(model: nn.Module) -> dict[str, MEmeL]:
    """The MEmeL modules inserted in ``model``, keyed by the name of the submodule they follow."""
    return {name: hook.memel for name, module in model.named_modules() for _, hook in _hooks_of(module)}


def _valid_name_hint(missing: list[str], names: list[str]) -> str:
    close = [match for name in missing for match in difflib.get_close_matches(name, names, n=3)]
    examples = list(dict.fromkeys(close)) or names[:8]
    return ", ".join(repr(name) for name in examples)


def insert_memel(
    model: nn.Module,
    after: Iterable[str] | str,
    top_t: int = 1,
    delta: float = 1.0,
    n_forget: int = 10,
    sync_ranks: bool = True,
) -> nn.Module:
    """Insert a MEmeL after each named submodule of ``model`` (in place) and return ``model``.

    ``after`` holds names from ``model.named_modules()``. Every name and option is checked before
    anything is changed; a wrong name raises :class:`InvalidOptionError` listing all missing names
    and some valid ones. Undo with :func:`remove_memel`.
    """
    names = [after] if isinstance(after, str) else list(after)
    modules = dict(model.named_modules())
    valid = [name for name in modules if name]
    if not names:
        hint = _valid_name_hint([], valid)
        raise InvalidOptionError(f"insert_memel: `after` is empty; name submodules such as {hint}")
    missing = [name for name in names if name not in modules]
    if missing:
        raise InvalidOptionError(
            f"insert_memel: {type(model).__name__} has no submodule named {', '.join(map(repr, missing))}; valid names"
            f" include {_valid_name_hint(missing, valid)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1} | set(find_memel(model)) & set(names))
    if repeated:
        raise InvalidOptionError(
            f"insert_memel: MEmeL would follow {', '.join(map(repr, repeated))} twice; name each submodule once"
            " (call remove_memel first to re-insert with other options)"
        )
    memels = [MEmeL(top_t=top_t, delta=delta, n_forget=n_forget, sync_ranks=sync_ranks, name=n) for n in names]
    for name, memel in zip(names, memels):
        modules[name].register_forward_hook(_MEmeLHook(memel))
    return model


def remove_memel(model: nn.Module) -> nn.Module:
    """Remove every MEmeL that :func:`insert_memel` put into ``model`` (in place); return ``model``.

    The module tree, parameters and ``state_dict`` are then those of the plain model. A model
    without MEmeL is returned unchanged.
    """
    for module in model.modules():
        for key, _ in _hooks_of(module):
            registries = (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called)
            for registry in registries:
                registry.pop(key, None)
    return model
