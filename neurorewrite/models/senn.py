"""SelfExpandingMLP: an MLP that grows width and depth while it trains, without changing its function.

Lifecycle (the growth hook): a training loop calls ``net.maybe_grow(x, y, epoch)`` once per epoch, before
that epoch's steps. Every ``config.cooldown`` epochs it scores the network on (up to
``config.score_batch_size`` samples of) ``x, y`` and adds neurons or layers while a proposal passes both
thresholds (at most ``config.max_additions`` per call, at most one of them a new layer). It returns the events; when any happened the
parameters were replaced, so the loop must rebuild its optimizer. :func:`neurorewrite.models.senn_train.fit`
is such a loop.

Growth is function-preserving: a new neuron gets zero outgoing weights; a new layer is the identity with
an identity activation (plus its new neuron, again with zero outgoing weights). Hidden layers use the
per-neuron rational activation of METHODS section 3; ``hidden`` may be empty (a linear model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models.senn_config import IDENTITY_INIT, LOSSES, NONLINEAR_INIT, SENNConfig, check_positive_int
from neurorewrite.models.senn_data import check_data
from neurorewrite.models.senn_distributed import agree_on_proposal, gather_scoring_batch
from neurorewrite.models.senn_grow import Proposal, propose
from neurorewrite.models.senn_layers import (
    RationalActivation,
    add_output_rows,
    add_zero_input_columns,
    identity_plus_rows,
)
from neurorewrite.models.senn_score import record_factors
from neurorewrite.models.senn_state import GROWTH_KEYS, GrowthState, read_growth_state, shapes_in, write_growth_state


@dataclass(frozen=True)
class GrowthEvent:
    """One growth step: ``kind`` "width" (a neuron added to hidden layer ``layer``) or "depth" (a hidden
    layer inserted at index ``layer``); ``widths`` are the hidden widths after it."""

    epoch: int
    kind: str
    layer: int
    widths: tuple[int, ...]
    gain: float
    eta: float
    ratio: float


class SelfExpandingMLP(nn.Module):
    """``in_features -> hidden... -> out_features`` with rational activations, grown by ``maybe_grow``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (),
        *,
        loss: str = "mse",
        config: SENNConfig | None = None,
        activation_init: tuple[float, float, float] = NONLINEAR_INIT,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise InvalidOptionError(f"SENN hidden must be a sequence of layer widths, got {hidden!r}")
        for i, width in enumerate(hidden):
            check_positive_int(f"hidden[{i}]", width)
        if loss not in LOSSES:
            raise InvalidOptionError(f"SENN loss must be one of {LOSSES}, got {loss!r}")
        if len(activation_init) != 3 or all(float(p) == 0.0 for p in activation_init):
            raise InvalidOptionError(f"SENN activation_init must be 3 numbers (v, c, l), not all 0, got {activation_init!r}")
        self.in_features, self.out_features, self.loss = in_features, out_features, loss
        self.config = config if config is not None else SENNConfig()
        self.activation_init = tuple(float(p) for p in activation_init)
        dims = [in_features, *hidden, out_features]
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        self.activations = nn.ModuleList(RationalActivation(w, self.activation_init) for w in hidden)
        self.history: list[GrowthEvent] = []
        self._next_check = 0
        self._generator = torch.Generator().manual_seed(self.config.seed)

    @property
    def widths(self) -> list[int]:
        """The current hidden widths (empty for a linear model)."""
        return [act.width for act in self.activations]

    def forward(self, x: Tensor) -> Tensor:
        for linear, activation in zip(self.linears, self.activations):
            x = activation(linear(x))
        return self.linears[-1](x)

    def forward_recording(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The input and the output (pre-activation) of every linear layer; the last output is ``y``."""
        sources, preacts = [], []
        for i, linear in enumerate(self.linears):
            sources.append(x)
            s = linear(x)
            preacts.append(s)
            if i < len(self.activations):
                x = self.activations[i](s)
        return sources, preacts

    def maybe_grow(self, x: Tensor, y: Tensor, epoch: int) -> list[GrowthEvent]:
        """Score and grow if ``epoch`` is due (every ``cooldown`` epochs); see the module docstring."""
        x, y = check_data(x, y, self.in_features, self.out_features, self.loss)
        if epoch < self._next_check:
            return []
        self._next_check = epoch + self.config.cooldown
        # Under torch.distributed every rank scores the same batch drawn from the union of the shards
        # and takes rank 0's decision (senn_distributed.py); alone, this is the plain subsample.
        sync = self.config.sync_ranks
        x, y = gather_scoring_batch(x, y, self.config.score_batch_size, self._generator, sync)
        events = []
        for _ in range(self.config.max_additions):
            proposal = self.propose(x, y, allow_depth=all(event.kind != "depth" for event in events))
            proposal = agree_on_proposal(proposal, [linear.in_features for linear in self.linears], sync)
            if proposal is None:
                break
            self.apply(proposal)
            events.append(self._event(epoch, proposal))
        self.history.extend(events)
        return events

    def propose(self, x: Tensor, y: Tensor, allow_depth: bool = True) -> Proposal | None:
        """Score every layer on ``(x, y)`` and return the best passing growth step, or None."""
        x, y = check_data(x, y, self.in_features, self.out_features, self.loss)
        dtype = self.linears[0].weight.dtype
        with torch.enable_grad():
            sources, preacts = self.forward_recording(x.to(dtype))
            recorded = record_factors(
                sources, preacts, y, self.loss, self.config.fisher, self.config.g_damping, self.config.a_damping
            )
        return propose(recorded, self.widths, self.config, self.activation_init, self._generator, allow_depth)

    def apply(self, proposal: Proposal) -> None:
        """Carry out a proposal (function-preserving); replaces parameters, so rebuild optimizers."""
        weight, bias = proposal.candidate.weight[None, :], proposal.candidate.bias.reshape(1)
        if proposal.kind == "width":
            self.grow_width(proposal.layer, weight, bias)
        else:
            self.grow_depth(proposal.layer, weight, bias)

    def grow_width(self, layer: int, weight_rows: Tensor, bias_rows: Tensor) -> None:
        """Add ``len(weight_rows)`` neurons to hidden layer ``layer`` with zero outgoing weights."""
        if not 0 <= layer < len(self.activations):
            raise InvalidOptionError(f"SENN grow_width: hidden layer {layer} does not exist (have {len(self.activations)})")
        count = weight_rows.shape[0]
        self.linears[layer] = add_output_rows(self.linears[layer], weight_rows, bias_rows)
        self.activations[layer].grow(count, self.activation_init)
        self.linears[layer + 1] = add_zero_input_columns(self.linears[layer + 1], count)

    def grow_depth(self, layer: int, weight_rows: Tensor, bias_rows: Tensor) -> None:
        """Insert hidden layer ``layer``: identity on its input plus the given neurons (zero outgoing)."""
        if not 0 <= layer < len(self.linears):
            raise InvalidOptionError(f"SENN grow_depth: position {layer} is outside 0..{len(self.linears) - 1}")
        width, count = self.linears[layer].in_features, weight_rows.shape[0]
        dtype = self.linears[layer].weight.dtype
        inserted = identity_plus_rows(width, weight_rows.to(dtype), bias_rows.to(dtype))
        activation = RationalActivation.concatenated([(width, IDENTITY_INIT), (count, self.activation_init)])
        self.linears[layer] = add_zero_input_columns(self.linears[layer], count)
        self.linears.insert(layer, inserted)
        self.activations.insert(layer, activation)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        history = [asdict(event) for event in self.history]
        write_growth_state(destination, prefix, GrowthState(self._next_check, self._generator.get_state(), history))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # A grown network's checkpoint has other widths (and maybe more layers) than this module: take
        # the checkpoint's shape first, then load as usual (torch loads the children after this method).
        dims, dtype = shapes_in(state_dict, prefix)
        if dims and (dims[0], dims[-1]) != (self.in_features, self.out_features):
            error_msgs.append(
                f"the SENN checkpoint maps {dims[0]} -> {dims[-1]} features but this module maps {self.in_features} ->"
                f" {self.out_features}"
            )
        elif dims and dims[1:-1] != self.widths:
            self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], dtype=dtype) for i in range(len(dims) - 1))
            self.activations = nn.ModuleList(RationalActivation(w, self.activation_init) for w in dims[1:-1])
        growth = read_growth_state(state_dict, prefix)
        if growth is None:
            missing_keys.extend(prefix + key for key in GROWTH_KEYS)
        else:
            self._next_check = growth.next_check
            self._generator.set_state(growth.generator)
            self.history = [GrowthEvent(**event) for event in growth.history]
        own = {k: v for k, v in state_dict.items() if k[len(prefix):] not in GROWTH_KEYS}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _event(self, epoch: int, proposal: Proposal) -> GrowthEvent:
        return GrowthEvent(
            epoch, proposal.kind, proposal.layer, tuple(self.widths), proposal.candidate.gain, proposal.eta, proposal.ratio
        )
