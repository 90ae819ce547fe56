"""What a SelfExpandingMLP checkpoint holds beyond its weights: the growth state and the shape.

:class:`~neurorewrite.models.senn.SelfExpandingMLP` adds three tensors to its ``state_dict``
(:data:`GROWTH_KEYS`: the next epoch due for scoring, the state of the generator that draws scoring
batches and candidate neurons, and the growth history as rows of numbers; tensors, because the
TorchScript ONNX exporter reads the ``state_dict`` and takes nothing else), and reads the layer
widths of a checkpoint with :func:`shapes_in` before loading it. So a freshly built network of the
same ``in_features``, ``out_features``, loss and config loads a grown checkpoint::

    net = SelfExpandingMLP(2, 1, config=config)
    net.load_state_dict(torch.load("senn.pt"))      # widths, layers, weights, growth state

Invariant: the loaded network's next ``maybe_grow`` scores the same samples with the same candidate
draws, and so takes the same decisions, as the saved one's would (``tests/models/test_checkpoints.py``).
The config is a constructor argument and is not in the checkpoint: build with the same one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GROWTH_KEYS", "GrowthState", "read_growth_state", "shapes_in", "write_growth_state"]

GROWTH_KEYS = ("growth_next_check", "growth_generator", "growth_history")
KINDS = ("width", "depth")
_LINEAR_WEIGHT = re.compile(r"linears\.(\d+)\.weight")
_FIXED_COLUMNS = 7  # epoch, kind, layer, gain, eta, ratio, number of widths; then the widths


@dataclass
class GrowthState:
    """The growth state of a SelfExpandingMLP; ``history`` rows are GrowthEvent keyword dicts."""

    next_check: int
    generator: torch.Tensor
    history: list[dict[str, Any]]


def write_growth_state(destination: dict[str, Any], prefix: str, state: GrowthState) -> None:
    """Add the :data:`GROWTH_KEYS` tensors for ``state`` to a ``state_dict`` under ``prefix``."""
    widest = max((len(event["widths"]) for event in state.history), default=0)
    rows = torch.zeros(len(state.history), _FIXED_COLUMNS + widest, dtype=torch.float64)
    for row, event in zip(rows, state.history):
        widths = list(event["widths"])
        row[:_FIXED_COLUMNS] = torch.tensor(
            [event["epoch"], KINDS.index(event["kind"]), event["layer"], event["gain"], event["eta"], event["ratio"],
             len(widths)], dtype=torch.float64)
        row[_FIXED_COLUMNS : _FIXED_COLUMNS + len(widths)] = torch.tensor(widths, dtype=torch.float64)
    destination[prefix + GROWTH_KEYS[0]] = torch.tensor(state.next_check, dtype=torch.int64)
    destination[prefix + GROWTH_KEYS[1]] = state.generator.clone()
    destination[prefix + GROWTH_KEYS[2]] = rows


def read_growth_state(state_dict: Mapping[str, Any], prefix: str) -> GrowthState | None:
    """The growth state saved under ``prefix``, or None when the state dict has none."""
    keys = [prefix + key for key in GROWTH_KEYS]
    if not all(key in state_dict for key in keys):
        return None
    next_check, generator, rows = (state_dict[key] for key in keys)
    history = []
    for row in rows.tolist():
        count = int(row[6])
        history.append({
            "epoch": int(row[0]), "kind": KINDS[int(row[1])], "layer": int(row[2]), "gain": row[3], "eta": row[4],
            "ratio": row[5], "widths": tuple(int(w) for w in row[_FIXED_COLUMNS : _FIXED_COLUMNS + count]),
        })
    return GrowthState(int(next_check), generator.detach().to("cpu", torch.uint8), history)


def shapes_in(state_dict: Mapping[str, Any], prefix: str) -> tuple[list[int], torch.dtype]:
    """``[in_features, hidden widths..., out_features]`` of the network saved under ``prefix`` and its
    weights' dtype; ``([], float32)`` when the state dict holds no linear layers under ``prefix``."""
    weights: dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            found = _LINEAR_WEIGHT.fullmatch(key[len(prefix):])
            if found and isinstance(value, torch.Tensor) and value.dim() == 2:
                weights[int(found.group(1))] = value
    if not weights or sorted(weights) != list(range(len(weights))):
        return [], torch.float32
    ordered = [weights[i] for i in range(len(weights))]
    return [ordered[0].shape[1], *(w.shape[0] for w in ordered)], ordered[0].dtype
