"""The kernel choice: costs -> batch ranges, the measured choice kept in the tuning database, estimates elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from neurorewrite.kernels import measure
from neurorewrite.kernels.choice import Choice, SparseLinearTask, candidates_for, choice_from_costs
from neurorewrite.kernels.measure import RECORDS, KernelRecords, choose, compile_alone, this_machine
from neurorewrite.ops import csr_arrays
from neurorewrite.runtime.tvm_target import parse_target
from tests.runtime.tvm_models import masked


def test_fastest_per_probe_becomes_batch_ranges() -> None:
    costs = {"small": {1: 1.0, 2: 2.0, 8: 8.0, 64: 64.0}, "big": {1: 5.0, 2: 5.0, 8: 5.0, 64: 20.0},
             "slow": {1: 9.0, 2: 9.0, 8: 9.0, 64: 90.0}}
    choice = choice_from_costs(costs, "measured")
    assert choice.ranges == [(1, "small"), (8, "big")]
    assert [choice.kernel_for(n) for n in (1, 7, 8, 1000)] == ["small", "small", "big", "big"]
    assert set(choice.timings_us) == {"small", "big"} and "n 1-7" in choice.describe()


def test_near_ties_do_not_split_ranges_and_at_most_two_kernels_stay() -> None:
    # b is fastest at 4 by 5% only: a keeps its range; with c fastest at 1 too, three would win: two stay
    costs = {"a": {1: 1.0, 4: 1.05, 16: 9.0, 64: 30.0}, "b": {1: 2.0, 4: 1.0, 16: 3.0, 64: 10.0},
             "c": {1: 3.0, 4: 3.0, 16: 3.5, 64: 11.0}}
    assert choice_from_costs(costs, "measured").ranges == [(1, "a"), (16, "b")]
    costs["c"][1] = 0.5
    ranges = choice_from_costs(costs, "measured").ranges
    assert len({name for _, name in ranges}) <= 2


def _task(rng: np.random.Generator, target: str | dict = "llvm") -> SparseLinearTask:
    w = masked(rng, 96, 80, 0.3)
    return SparseLinearTask("fc", 80, 96, *csr_arrays(w), rng.standard_normal(96).astype(np.float32), 1, parse_target(target))


def test_measured_choice_is_recorded_once_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "MIN_MEASURED_NONZEROS", 0)  # time even this small layer
    monkeypatch.setattr(measure, "ROUNDS", 1)
    task = _task(np.random.default_rng(0))
    candidates = candidates_for(task)
    first = choose(task, candidates, (1, 16), KernelRecords(tmp_path))
    assert first.source == "measured"
    (record,) = json.loads((tmp_path / RECORDS).read_text())["records"].values()
    assert record["layer"] == "fc" and set(record["timings_us"]) == {c.name for c in candidates}
    assert all(set(per) == {"1", "16"} for per in record["timings_us"].values())
    assert [tuple(r) for r in record["choice"]] == first.ranges

    def no_timing(*_args: object) -> None:
        raise AssertionError("a recorded layer must not be timed again")

    monkeypatch.setattr(measure, "time_candidates", no_timing)
    again = choose(task, candidates_for(task), (1, 16), KernelRecords(tmp_path))
    assert again.source == "recorded" and again.ranges == first.ranges
    # another batch ladder is another record: measured (here: refused by the stub)
    with pytest.raises(AssertionError, match="recorded layer"):
        choose(task, candidates_for(task), (1, 32), KernelRecords(tmp_path))


def test_other_targets_use_the_estimates() -> None:
    rng = np.random.default_rng(1)
    other = {"kind": "llvm", "mcpu": "skylake-avx512" if not this_machine(parse_target({"kind": "llvm", "mcpu": "skylake-avx512"})) else "haswell"}
    task = _task(rng, other)
    assert not this_machine(task.target) and this_machine(parse_target("llvm"))
    choice = choose(task, candidates_for(task), (1, 64), KernelRecords(None))
    assert choice.source == "estimated" and isinstance(choice, Choice)
    assert choose(_task(rng), candidates_for(_task(rng)), (1,), None, measure=False).source == "estimated"


@pytest.mark.slow
def test_every_candidate_builds_for_avx512_and_avx2() -> None:
    # the kernel choice on an Intel AVX-512 or AMD Zen machine times these: they must all compile there
    rng = np.random.default_rng(2)
    for mcpu in ("skylake-avx512", "znver3"):
        task = _task(rng, {"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
        candidates = candidates_for(task)
        families = {c.kernel for c in candidates}
        assert {"column-blocked ELL", "dense tiles", "sliced-ELL gather", "TensorIR ELL"} <= families
        assert set(compile_alone(candidates, task.target)) == {c.name for c in candidates}
