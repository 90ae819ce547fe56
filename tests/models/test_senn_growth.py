"""SENN growth keeps the function (1e-6) across every width and depth event; thresholds, cooldown, caps."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import make_moons

from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import fit, mean_loss

torch.set_num_threads(1)
ALWAYS = dict(tau=0.0, alpha_abs=0.0, candidates=4, search_steps=5)


def _regression(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen) * 2 - 1
    return x, torch.stack([torch.sin(4 * x[:, 0]) * x[:, 1], torch.cos(3 * x[:, 1])], dim=1)


def _moons(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_moons(n, noise=0.1, random_state=0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _assert_same_function(before: torch.Tensor, net: SelfExpandingMLP, probe: torch.Tensor) -> None:
    with torch.no_grad():
        after = net(probe)
    assert (after - before).abs().max().item() <= 1e-6


@pytest.mark.parametrize("hidden", [[], [3], [4, 2]])
def test_explicit_width_and_depth_growth_keep_outputs(hidden: list[int]) -> None:
    torch.manual_seed(0)
    net = SelfExpandingMLP(2, 2, hidden)
    probe = torch.randn(64, 2) * 3
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        with torch.no_grad():
            before = net(probe)
        rows, bias = torch.randn(2, 0, generator=gen), torch.randn(2, generator=gen)
        if step % 2 == 0 or not net.widths:
            position = step % len(net.linears)
            rows = torch.randn(2, net.linears[position].in_features, generator=gen)
            net.grow_depth(position, rows, bias)
        else:
            layer = step % len(net.widths)
            rows = torch.randn(2, net.linears[layer].in_features, generator=gen)
            net.grow_width(layer, rows, bias)
        _assert_same_function(before, net, probe)
    assert len(net.widths) == len(hidden) + 3


def test_scored_growth_keeps_outputs_at_every_event() -> None:
    torch.manual_seed(0)
    net = SelfExpandingMLP(2, 2, [], config=SENNConfig(**ALWAYS, depth_margin=0.0))
    x, y = _regression()
    kinds = []
    for _ in range(8):
        with torch.no_grad():
            before = net(x)
        proposal = net.propose(x, y, allow_depth=len(kinds) % 3 == 0)
        assert proposal is not None
        net.apply(proposal)
        kinds.append(proposal.kind)
        _assert_same_function(before, net, x)
        fit(net, x, y, epochs=1, grow=False)  # train between events so later ones start from a trained net
    assert "depth" in kinds and "width" in kinds


def test_maybe_grow_respects_cooldown_and_reports_events() -> None:
    torch.manual_seed(0)
    net = SelfExpandingMLP(2, 2, [2], config=SENNConfig(**ALWAYS, cooldown=3, max_additions=2, allow_depth=False))
    x, y = _regression()
    counts = [len(net.maybe_grow(x, y, epoch)) for epoch in range(7)]
    assert counts == [2, 0, 0, 2, 0, 0, 2]
    assert net.widths == [8]
    assert [event.widths for event in net.history][:2] == [(3,), (4,)]
    assert all(event.kind == "width" and event.epoch % 3 == 0 for event in net.history)


@pytest.mark.parametrize("thresholds", [dict(tau=1e9), dict(alpha_abs=1e9)])
def test_each_threshold_alone_blocks_growth(thresholds: dict) -> None:
    torch.manual_seed(0)
    options = {**ALWAYS, **thresholds}
    net = SelfExpandingMLP(2, 2, [2], config=SENNConfig(**options))
    x, y = _regression()
    assert net.maybe_grow(x, y, 0) == []
    assert net.widths == [2]


def test_size_caps_stop_growth() -> None:
    torch.manual_seed(0)
    net = SelfExpandingMLP(2, 2, [2], config=SENNConfig(**ALWAYS, max_width=3, max_hidden_layers=1, max_additions=5))
    x, y = _regression()
    events = net.maybe_grow(x, y, 0)
    assert [e.kind for e in events] == ["width"]
    assert net.widths == [3]


def test_moons_from_no_hidden_layer_adds_one_and_improves() -> None:
    torch.manual_seed(0)
    x, y = _moons()
    net = SelfExpandingMLP(2, 2, [], loss="cross_entropy", config=SENNConfig(cooldown=5))
    result = fit(net, x, y, epochs=60, lr=2e-2)
    depth_events = [e for e in result.events if e.kind == "depth"]
    assert depth_events and depth_events[0].layer == 0
    assert len(net.widths) >= 1
    linear = SelfExpandingMLP(2, 2, [], loss="cross_entropy")
    fit(linear, x, y, epochs=60, lr=2e-2, grow=False)
    linear_loss = mean_loss(linear, x, y)
    assert mean_loss(net, x, y) < 0.8 * linear_loss
