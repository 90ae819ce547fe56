"""Resumed runs equal uninterrupted ones: MEmeL statistics, SENN growth state, FPE masks and widths."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import neurorewrite.models.fpe as fpe_module
from neurorewrite.errors import InvalidOptionError
from neurorewrite.models import MaskedLinear, finetune, fpe_expand, insert_memel
from neurorewrite.models.fpe_checkpoint import fpe_state_dict, load_fpe_state_dict
from neurorewrite.models.fpe_structured import TiedLinear
from neurorewrite.models.memel_checkpoint import load_memel_state_dict, memel_state_dict
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import FitState, fit

torch.set_num_threads(1)


def _round_trip(value: Any) -> Any:
    """Through torch.save / torch.load (default weights_only), as a checkpoint file would go."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def _batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, 6, generator=generator), torch.randint(0, 3, (24,), generator=generator))
            for _ in range(count)]


# --- MEmeL ------------------------------------------------------------------------------------------


def _memel_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    model = insert_memel(_mlp(seed), after=["1", "3"], top_t=2, n_forget=4)
    seen: list[torch.Tensor] = []  # what MEmeL after "1" returned each step (its hook runs first)
    model[1].register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), seen


def _memel_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("restore_memel", [True, False])
def test_memel_resumed_run_selects_exactly_what_the_uninterrupted_one_does(restore_memel: bool) -> None:
    batches = _batches(10)
    whole, whole_optimizer, whole_seen = _memel_model(0)
    _memel_steps(whole, whole_optimizer, batches)

    first, first_optimizer, _ = _memel_model(0)
    _memel_steps(first, first_optimizer, batches[:6])
    saved = _round_trip({"model": first.state_dict(), "optimizer": first_optimizer.state_dict(),
                         "memel": memel_state_dict(first)})
    resumed, optimizer, seen = _memel_model(5)  # other initial weights: everything must come from the file
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if restore_memel:
        load_memel_state_dict(resumed, saved["memel"])
    _memel_steps(resumed, optimizer, batches[6:])

    same_outputs = all(torch.equal(a, b) for a, b in zip(seen, whole_seen[6:]))
    same_weights = all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))
    if restore_memel:
        assert same_outputs and same_weights
        for name, state in memel_state_dict(resumed).items():
            reference = memel_state_dict(whole)[name]
            assert state["_extra_state"] == reference["_extra_state"]
            assert torch.equal(state["mean"], reference["mean"]) and torch.equal(state["m2"], reference["m2"])
    else:  # the control: without the statistics MEmeL warms up again and the run departs
        assert not same_outputs and not same_weights


def test_memel_state_must_name_the_same_places() -> None:
    model = insert_memel(_mlp(0), after=["1", "3"])
    state = memel_state_dict(model)
    other = insert_memel(_mlp(0), after=["1"])
    with pytest.raises(InvalidOptionError, match=r"'3'.*no MEmeL there"):
        load_memel_state_dict(other, state)
    wrapped = nn.DataParallel(model)  # wrappers are unwrapped: same names
    assert set(memel_state_dict(wrapped)) == {"1", "3"}


# --- SENN -------------------------------------------------------------------------------------------

CONFIG = SENNConfig(tau=0.0, alpha_abs=0.0, candidates=4, search_steps=5, cooldown=2, max_additions=1, depth_margin=0.5)


def _regression(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=generator) * 2 - 1
    return x, torch.sin(3 * x[:, :1]) * x[:, 1:]


def test_senn_resumed_fit_grows_and_trains_exactly_like_the_uninterrupted_one() -> None:
    x, y = _regression()
    torch.manual_seed(0)
    whole = SelfExpandingMLP(2, 1, [], config=CONFIG)
    whole_result = fit(whole, x, y, epochs=9, batch_size=32)

    torch.manual_seed(0)
    first = SelfExpandingMLP(2, 1, [], config=CONFIG)
    checkpoints: dict[int, Any] = {}
    fit(first, x, y, epochs=9, batch_size=32,
        on_epoch=lambda state: checkpoints.update(
            {state.epoch: _round_trip({"net": first.state_dict(), "fit": state.to_dict()})}
        ))
    saved = checkpoints[5]
    torch.manual_seed(3)
    resumed = SelfExpandingMLP(2, 1, [], config=CONFIG)  # no hidden layer yet: the shapes come from the file
    resumed.load_state_dict(saved["net"])
    state = FitState.from_dict(saved["fit"])
    assert state.epoch == 5
    result = fit(resumed, x, y, epochs=9, batch_size=32, resume=state)

    assert resumed.widths == whole.widths and len(whole.widths) >= 1
    assert result.events == [event for event in whole_result.events if event.epoch >= 5] and result.events
    assert resumed.history == whole.history
    assert result.losses == whole_result.losses[5:]
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_senn_checkpoint_of_another_shape_is_refused() -> None:
    net = SelfExpandingMLP(2, 1, [3])
    with pytest.raises(RuntimeError, match="maps 2 -> 1 features but this module maps 3 -> 1"):
        SelfExpandingMLP(3, 1, []).load_state_dict(net.state_dict())


# --- FPE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_fpe_resumed_finetune_equals_the_uninterrupted_one_without_reexpanding(
    monkeypatch: pytest.MonkeyPatch, structured: bool
) -> None:
    batches = _batches(6, seed=2)

    def adam(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)

    whole = fpe_expand(_mlp(0), alpha=3, seed=4, structured=structured)
    finetune(whole, batches, epochs=4, optimizer=adam(whole))

    first = fpe_expand(_mlp(0), alpha=3, seed=4, structured=structured)
    first_optimizer = adam(first)
    finetune(first, batches, epochs=2, optimizer=first_optimizer)
    saved = _round_trip({"fpe": fpe_state_dict(first), "optimizer": first_optimizer.state_dict()})

    monkeypatch.setattr(fpe_module, "expand_block", lambda *_: pytest.fail("the expansion was recomputed"))
    template = _mlp(7)  # the dense architecture; its weights do not matter
    resumed = load_fpe_state_dict(template, saved["fpe"])
    assert isinstance(template[0], nn.Linear) and not isinstance(template[0], MaskedLinear)  # unchanged
    assert resumed.fpe_record.blocks == whole.fpe_record.blocks
    assert isinstance(resumed[4], TiedLinear) == structured
    optimizer = adam(resumed)
    optimizer.load_state_dict(saved["optimizer"])
    finetune(resumed, batches, epochs=2, optimizer=optimizer)

    assert list(resumed.state_dict()) == list(whole.state_dict())
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for layer in (m for m in resumed.modules() if isinstance(m, MaskedLinear)):
        assert torch.count_nonzero(layer.weight[~layer.weight_mask]) == 0


def test_fpe_checkpoint_errors_name_the_problem() -> None:
    expanded = fpe_expand(_mlp(0), alpha=2)
    saved = fpe_state_dict(expanded)
    with pytest.raises(InvalidOptionError, match="not an FPE checkpoint"):
        load_fpe_state_dict(_mlp(0), {"state_dict": saved["state_dict"]})
    with pytest.raises(InvalidOptionError, match="no submodule '2'"):
        load_fpe_state_dict(nn.Sequential(nn.Linear(6, 12)), saved)
    with pytest.raises(InvalidOptionError, match="no fpe_record"):
        fpe_state_dict(_mlp(0))
    longer = nn.Sequential(*_mlp(0), nn.ReLU(), nn.Linear(3, 2))  # a layer the checkpoint does not have
    with pytest.raises(InvalidOptionError, match="does not fit the template.*6.weight"):
        load_fpe_state_dict(longer, saved)
