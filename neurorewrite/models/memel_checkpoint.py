"""Checkpoints of MEmeL's running statistics, saved beside the model's ``state_dict``.

:func:`~neurorewrite.models.memel.insert_memel` keeps the model's ``state_dict`` keys exactly those of
the plain model (a tested promise: plain checkpoints load into MEmeL models and back, strictly), so
the statistics travel in one documented call beside it::

    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "memel": memel_state_dict(model)}
    ...
    insert_memel(fresh, after=[...], top_t=..., n_forget=...)    # the same places and options
    fresh.load_state_dict(checkpoint["model"])
    load_memel_state_dict(fresh, checkpoint["memel"])

Invariant: after that, the next training step of ``fresh`` selects, replaces and merges exactly what
the saved model's next step would (same running mean, ``m2``, sample count and batches seen, so
warm-up is not repeated); ``tests/models/test_checkpoints.py`` resumes a run and compares every
output. DDP wrappers are unwrapped, so the names are the same with and without one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models.distributed import unwrap
from neurorewrite.models.memel import find_memel

__all__ = ["load_memel_state_dict", "memel_state_dict"]


def memel_state_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name of the hooked submodule: that MEmeL's state_dict}`` for every MEmeL in ``model``.

    Each entry holds ``mean``, ``m2`` (the live buffers, as ``state_dict`` gives them) and
    ``_extra_state`` (the sample count and the batches seen)."""
    return {name: memel.state_dict() for name, memel in find_memel(unwrap(model)).items()}


def load_memel_state_dict(model: nn.Module, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore what :func:`memel_state_dict` saved into the MEmeLs of ``model`` (in place).

    The model must carry a MEmeL after exactly the saved submodules (insert them first); otherwise
    :class:`InvalidOptionError` names the missing and the unexpected ones and nothing is loaded."""
    memels = find_memel(unwrap(model))
    missing, unexpected = sorted(set(state) - set(memels)), sorted(set(memels) - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"saved for {', '.join(map(repr, missing))} but the model has no MEmeL there")
        if unexpected:
            parts.append(f"the model's MEmeL after {', '.join(map(repr, unexpected))} has no saved state")
        raise InvalidOptionError(
            f"load_memel_state_dict: {'; '.join(parts)} (insert_memel after the same submodules before loading)"
        )
    for name, memel in memels.items():
        memel.load_state_dict(dict(state[name]))
