"""MEmeL under torch.distributed: two gloo ranks on shards of each batch act like one process on it, on
the fused C kernel's path and on the eager torch path (each reduces the batch sums its own way)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neurorewrite.models.memel import MEmeL
from neurorewrite.models.memel_fused import eager_only

BATCHES, BATCH, SHARDS = 8, 16, (10, 6)  # unequal shards: the count must be summed too


def _stream() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(BATCH, 3, 5, generator=generator).exp() for _ in range(BATCHES)]


def _run(memel: MEmeL, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    record: dict[str, list[torch.Tensor]] = {"out": [], "grad": [], "mean": [], "variance": [], "count": []}
    upstream = torch.linspace(-1.0, 1.0, 15).reshape(3, 5)
    for batch in batches:
        z = batch.clone().requires_grad_(True)
        out = memel(z)
        (out * upstream).sum().backward()
        assert z.grad is not None
        for key, value in (("out", out), ("grad", z.grad), ("mean", memel.mean), ("variance", memel.variance),
                           ("count", torch.tensor(memel.count))):
            record[key].append(value.detach().clone())
    return record


def _shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SHARDS[:rank])
    return batch[start : start + SHARDS[rank]]


def _path(name: str) -> contextlib.AbstractContextManager:
    return eager_only() if name == "eager" else contextlib.nullcontext()


def _worker(rank: int, init_file: str, out_dir: str, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SHARDS))
    try:
        shards = [_shard(batch, rank) for batch in _stream()]
        with _path(path):
            synced = _run(MEmeL(top_t=2, n_forget=3).train(), shards)
            local = _run(MEmeL(top_t=2, n_forget=3, sync_ranks=False).train(), shards)
        torch.save({"synced": synced, "local": local}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["fused", "eager"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    """The path and what each of the two gloo ranks recorded on it (one spawn per path)."""
    folder = tmp_path_factory.mktemp(f"memel_dist_{request.param}")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder), request.param), nprocs=len(SHARDS), join=True)
    return request.param, [torch.load(folder / f"rank{rank}.pt") for rank in range(len(SHARDS))]


def test_two_ranks_on_shards_match_one_process_on_the_whole_batch(ranks: tuple[str, list[dict]]) -> None:
    path, ranks = ranks
    with _path(path):
        whole = _run(MEmeL(top_t=2, n_forget=3).train(), _stream())
    inhibited_steps = 0
    for step in range(BATCHES):
        for key in ("mean", "variance"):
            for rank in ranks:
                torch.testing.assert_close(rank["synced"][key][step], whole[key][step], rtol=1e-5, atol=1e-6)
        assert all(rank["synced"]["count"][step].item() == whole["count"][step].item() for rank in ranks)
        for key in ("out", "grad"):  # same selections, same values and gradients on each rank's samples
            joined = torch.cat([rank["synced"][key][step] for rank in ranks])
            torch.testing.assert_close(joined, whole[key][step], rtol=1e-5, atol=1e-6)
        inhibited_steps += int(not torch.equal(whole["out"][step], _stream()[step]))
    assert inhibited_steps == BATCHES - 3


def test_sync_ranks_false_keeps_per_rank_statistics(ranks: tuple[str, list[dict]]) -> None:
    path, ranks = ranks
    for rank in range(len(SHARDS)):
        local = ranks[rank]["local"]
        with _path(path):
            alone = _run(MEmeL(top_t=2, n_forget=3).train(), [_shard(batch, rank) for batch in _stream()])
        for key in ("mean", "variance", "out", "grad"):
            torch.testing.assert_close(torch.stack(local[key]), torch.stack(alone[key]))
        assert local["count"][0].item() == SHARDS[rank]


if not dist.is_available():  # pragma: no cover - every CPU build of torch here has gloo
    pytestmark = pytest.mark.skip(reason="torch.distributed is not available")
