"""Two gloo ranks under DistributedDataParallel: FPE fine-tuning, distillation and SENN growth.

One spawn runs every scenario (torch starts once per rank); each rank trains on its half of every
global batch and saves its final state; the tests compare the ranks with each other and with one
process on the global batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from neurorewrite.models import MaskedLinear, finetune, fpe_expand
from neurorewrite.models.distributed import RankShards
from neurorewrite.models.masked_training import masked_train, teacher_loss
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import fit

RANKS, GLOBAL_BATCH, BATCHES, EPOCHS = 2, 32, 6, 3
SENN_CONFIG = SENNConfig(tau=0.0, alpha_abs=0.0, candidates=4, search_steps=5, cooldown=2, max_additions=1,
                         depth_margin=0.5, score_batch_size=40)  # 96 samples in all: the draw spans both shards


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator))
        for _ in range(BATCHES)
    ]


def _all_inputs() -> torch.Tensor:
    return torch.cat([x for x, _ in _global_batches()])


def _shard(batch: Any, rank: int) -> Any:
    size = GLOBAL_BATCH // RANKS
    if isinstance(batch, torch.Tensor):
        return batch[rank * size : (rank + 1) * size]
    return tuple(_shard(part, rank) for part in batch)


def _regression() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(96, 2, generator=generator) * 2 - 1
    return x, torch.sin(3 * x[:, :1]) * x[:, 1:]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _scenarios(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tuned = fpe_expand(_mlp(), alpha=3, seed=4)
    wrapped = DistributedDataParallel(tuned)
    shards = [_shard(b, rank) for b in _global_batches()]
    result = finetune(wrapped, shards, epochs=EPOCHS, optimizer=_optimizer(wrapped))
    out["finetune"] = {"state": tuned.state_dict(), "losses": result.epoch_losses}

    student = fpe_expand(_mlp(), alpha=2, seed=1)
    wrapped = DistributedDataParallel(student)
    inputs = RankShards((_all_inputs(),), GLOBAL_BATCH, seed=3)  # this rank's half of each shuffled global batch
    losses = masked_train(wrapped, inputs, teacher_loss(_mlp()), epochs=EPOCHS, optimizer=_optimizer(wrapped))
    out["distill"] = {"state": student.state_dict(), "losses": losses}

    x, y = _regression()
    for name, seed, sync in (("senn", 0, True), ("senn_seeds_differ", rank, True), ("senn_own", 0, False)):
        torch.manual_seed(rank)  # different initial weights: DDP's broadcast must make them rank 0's
        config = SENNConfig(**{**SENN_CONFIG.__dict__, "seed": seed, "sync_ranks": sync})
        net = SelfExpandingMLP(2, 1, [], config=config)
        result = fit(net, x[rank * 48 : (rank + 1) * 48], y[rank * 48 : (rank + 1) * 48], epochs=6, batch_size=16)
        out[name] = {"state": net.state_dict(), "events": result.events, "losses": result.losses}
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    try:
        torch.save(_scenarios(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=RANKS, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]


def _assert_masks_hold(state: dict[str, torch.Tensor]) -> None:
    masks = [key for key in state if key.endswith("weight_mask")]
    assert masks
    for key in masks:
        weight = state[key.replace("weight_mask", "weight")]
        assert torch.count_nonzero(weight[~state[key]]) == 0, f"{key}: a pruned weight is nonzero"
        assert torch.count_nonzero(weight[state[key]]) == int(state[key].sum()), f"{key}: a kept weight is zero"


def _assert_ranks_identical(ranks: list[dict[str, Any]], scenario: str) -> None:
    first = ranks[0][scenario]["state"]
    for other in ranks[1:]:
        assert list(other[scenario]["state"]) == list(first)
        for key, value in first.items():
            assert torch.equal(other[scenario]["state"][key], value), f"{scenario}: {key} differs between ranks"


@pytest.mark.parametrize("scenario", ["finetune", "distill"])
def test_masked_training_keeps_masks_and_identical_ranks_equal_to_one_process(
    ranks: list[dict[str, Any]], scenario: str
) -> None:
    for rank in ranks:
        _assert_masks_hold(rank[scenario]["state"])
    _assert_ranks_identical(ranks, scenario)
    if scenario == "finetune":
        alone = fpe_expand(_mlp(), alpha=3, seed=4)
        losses = finetune(alone, _global_batches(), epochs=EPOCHS, optimizer=_optimizer(alone)).epoch_losses
    else:
        alone = fpe_expand(_mlp(), alpha=2, seed=1)
        inputs = RankShards((_all_inputs(),), GLOBAL_BATCH, seed=3)  # one process: the global batches themselves
        losses = masked_train(alone, inputs, teacher_loss(_mlp()), epochs=EPOCHS, optimizer=_optimizer(alone))
    for key, value in alone.state_dict().items():  # the gradient mean over ranks rounds differently
        torch.testing.assert_close(ranks[0][scenario]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert ranks[0][scenario]["losses"] == pytest.approx(losses, rel=1e-5)
    assert isinstance(alone[0], MaskedLinear)


def test_senn_grows_identically_on_every_rank_as_one_process_would(ranks: list[dict[str, Any]]) -> None:
    _assert_ranks_identical(ranks, "senn")
    events = ranks[0]["senn"]["events"]
    assert events == ranks[1]["senn"]["events"] and len(events) >= 2
    # The first decision is the one a single process holding both shards takes (the same scoring batch).
    torch.manual_seed(0)
    alone = SelfExpandingMLP(2, 1, [], config=SENN_CONFIG)
    assert alone.maybe_grow(*_regression(), 0) == [event for event in events if event.epoch == 0]


def test_senn_ranks_agree_even_when_their_generators_differ(ranks: list[dict[str, Any]]) -> None:
    """Rank 1 draws with another seed: rank 0's scoring batch and decisions are broadcast."""
    first, second = (rank["senn_seeds_differ"] for rank in ranks)
    assert first["events"] == second["events"] and first["events"]
    for key, value in first["state"].items():
        if key != "growth_generator":  # the one thing that legitimately differs
            assert torch.equal(second["state"][key], value), key


def test_senn_with_sync_ranks_off_keeps_each_ranks_network_its_own(ranks: list[dict[str, Any]]) -> None:
    x, y = _regression()
    for rank, record in enumerate(ranks):
        torch.manual_seed(rank)
        alone = SelfExpandingMLP(2, 1, [], config=SENNConfig(**{**SENN_CONFIG.__dict__, "sync_ranks": False}))
        shard = slice(rank * 48, (rank + 1) * 48)
        first = [event for event in record["senn_own"]["events"] if event.epoch == 0]
        assert alone.maybe_grow(x[shard], y[shard], 0) == first and first
    first, second = (rank["senn_own"]["state"]["linears.0.weight"] for rank in ranks)
    assert not torch.equal(first, second)


if not dist.is_available():  # pragma: no cover - every CPU build of torch here has gloo
    pytestmark = pytest.mark.skip(reason="torch.distributed is not available")
