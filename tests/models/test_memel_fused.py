"""MEmeL's fused CPU kernel against its eager torch code: same selections, outputs, gradients, statistics."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import neurorewrite.models.memel as memel_module
from neurorewrite.models.memel import MEmeL, first_argmax_
from neurorewrite.models.memel_fused import eager_only
from neurorewrite.models.memel_native import kernel_status, native_kernel

KERNEL = native_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"MEmeL runs {kernel_status()}")


def _stream(seed: int, sizes: list[int], shape: tuple[int, ...]) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_t(3, size=(n, *shape)) + 3.0, dtype=torch.float32) for n in sizes]


def _run(memel: MEmeL, batches: list[torch.Tensor]) -> list[dict[str, object]]:
    upstream = torch.Generator().manual_seed(1)
    record = []
    for batch in batches:
        z = batch.clone().requires_grad_(True)
        out = memel(z)
        grad_out = torch.randn(out.shape, generator=upstream)
        (out * grad_out).sum().backward()
        assert z.grad is not None
        record.append({"out": out.detach(), "grad": z.grad, "mean": memel.mean.clone(), "m2": memel.m2.clone(),
                       "extra": memel.get_extra_state()})
    return record


@needs_kernel
@pytest.mark.parametrize("top_t, delta, shape", [(1, 1.0, (3, 7)), (1, -1.0, (2500,)), (3, 2.5, (6, 5))])
def test_fused_and_eager_select_the_same_elements_with_the_same_values_and_gradients(
    top_t: int, delta: float, shape: tuple[int, ...]
) -> None:
    # 2500 features: three column blocks of the kernel and a tail that is not a multiple of its 8 lanes.
    batches = _stream(0, [40] * 6 + [9, 40], shape)
    fused = _run(MEmeL(top_t=top_t, delta=delta, n_forget=3).train(), batches)
    with eager_only():
        eager = _run(MEmeL(top_t=top_t, delta=delta, n_forget=3).train(), batches)
    inhibited = 0
    for step, (a, b) in enumerate(zip(fused, eager)):
        selected = a["out"] != batches[step].reshape(a["out"].shape)
        assert torch.equal(selected, b["out"] != batches[step].reshape(b["out"].shape)), f"step {step}: selections"
        # The replacement is each path's own running mean, and those agree to float32 rounding.
        torch.testing.assert_close(a["out"], b["out"], rtol=1e-6, atol=1e-6)
        assert torch.equal(a["grad"], b["grad"]), f"step {step}: different gradients"
        torch.testing.assert_close(a["mean"], b["mean"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a["m2"], b["m2"], rtol=1e-5, atol=1e-4)
        assert a["extra"] == b["extra"]
        inhibited += int(not torch.equal(a["out"], batches[step].reshape(a["out"].shape)))
    assert inhibited == len(batches) - 3


@needs_kernel
def test_kernel_top1_is_the_first_maximum_including_ties_nan_and_the_row_tail() -> None:
    # Three column blocks; the last has 52 columns: one round of both 16-lane chains, one more vector
    # (the first chain's), and 4 tail columns.
    rows, cols = 8, 2100
    z = torch.zeros(rows, cols)
    z[0, [5, 900, 1500]] = 3.0  # a tie inside the first block and across blocks: the first wins
    z[1, [1030, 2099]] = -3.0  # the largest |z - mean| lies in the second block; later ties lose
    z[2, 2098] = 4.0  # the maximum in the tail
    z[3] = 1.0  # every element ties: index 0
    z[4] = float("nan")  # no maximum: index 0, the NaN row copied through
    z[5, [7, 15]] = 2.0  # two lanes of one vector hold the same maximum: the lower column wins
    z[6, [20, 32]] = 2.0  # a tie across the chains: 20 (second chain) before 32 (first chain's next vector)
    z[7, [2085, 2097]] = 5.0  # the maximum in the vector after the chains' rounds, tied in the tail
    mean, m2 = torch.zeros(cols), torch.ones(cols)
    packed = torch.zeros(1 + 2 * cols, dtype=torch.float64)
    out, index, best = torch.empty_like(z), torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    assert KERNEL is not None
    KERNEL.step(z, mean, m2, 20.0, packed, out=out, index=index, best=best)
    assert index.tolist() == [5, 1030, 2098, 0, 0, 7, 20, 2085]
    expected = first_argmax_(z.square()[:4].clone())[:, 0].tolist()
    assert index[:4].tolist() == expected
    replaced = z.clone()
    replaced[torch.arange(rows), index] = 0.0  # the running mean
    torch.testing.assert_close(out, replaced, equal_nan=True)
    sums = packed[1:].reshape(2, cols)
    torch.testing.assert_close(sums[0], z.double().sum(0), equal_nan=True)
    torch.testing.assert_close(sums[1], z.double().square().sum(0), equal_nan=True)


def test_non_contiguous_float64_and_bfloat16_activations_take_the_eager_path() -> None:
    z = torch.randn(12, 10)
    statistics = torch.zeros(12)
    assert memel_module.fused_kernel_for(z.t(), statistics) is None  # a transposed 2-D activation
    assert memel_module.fused_kernel_for(z.double(), statistics.double()) is None
    assert memel_module.fused_kernel_for(z.bfloat16(), statistics) is None
    assert memel_module.fused_kernel_for(z, statistics) is KERNEL
    with eager_only():
        assert memel_module.fused_kernel_for(z, statistics) is None


def test_a_transposed_activation_gives_what_its_contiguous_copy_gives() -> None:
    batches = _stream(2, [16] * 4, (6,))
    transposed = [batch.t().contiguous().t() for batch in batches]  # same values, column-major
    strided = _run(MEmeL(n_forget=2).train(), transposed)
    dense = _run(MEmeL(n_forget=2).train(), batches)
    for a, b in zip(strided, dense):
        torch.testing.assert_close(a["out"], b["out"], rtol=1e-6, atol=1e-6)  # eager vs fused statistics
        assert torch.equal(a["grad"], b["grad"])  # so the same selections
        torch.testing.assert_close(a["mean"], b["mean"], rtol=1e-6, atol=1e-6)


def test_the_environment_variable_turns_the_kernel_off() -> None:
    code = (
        "from neurorewrite.models.memel_native import kernel_status, native_kernel;"
        " print(native_kernel(), kernel_status())"
    )
    env = {**os.environ, "NEUROREWRITE_MEMEL_KERNEL": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.startswith("None eager torch (NEUROREWRITE_MEMEL_KERNEL=0)")


@needs_kernel
@pytest.mark.parametrize("top_t", [1, 2])
def test_the_kernel_gives_the_same_result_on_any_number_of_threads(top_t: int) -> None:
    rows, cols = 9, 3000
    z = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    z[:, [100, 1600, 2999]] = 7.0  # every row's maximum ties across three thread ranges: the first wins
    z[3, 2999] = 8.0
    mean, m2 = torch.zeros(cols), torch.ones(cols)
    results = []
    for threads in (1, 2, 3, 7):
        packed = torch.zeros(1 + 2 * cols, dtype=torch.float64)
        out, index, best, phi = torch.empty_like(z), torch.empty(rows, dtype=torch.int64), torch.empty(rows), None
        assert KERNEL is not None
        if top_t == 1:
            KERNEL.step(z, mean, m2, 20.0, packed, out=out, index=index, best=best, threads=threads)
        else:
            phi = torch.empty_like(z)
            KERNEL.step(z, mean, m2, 20.0, packed, phi=phi, threads=threads)
        results.append((packed, out if top_t == 1 else phi, index if top_t == 1 else None))
    for packed, values, index in results[1:]:
        assert torch.equal(packed, results[0][0]) and torch.equal(values, results[0][1])
        if index is not None:
            assert torch.equal(index, results[0][2])
    if top_t == 1:
        assert results[0][2].tolist() == [100, 100, 100, 2999, 100, 100, 100, 100, 100]


@needs_kernel
def test_pooled_outputs_are_reused_only_when_nothing_holds_them() -> None:
    memel = MEmeL(n_forget=1).train()
    batches = _stream(5, [8] * 6, (40,))
    memel(batches[0])
    kept = memel(batches[1])  # the caller keeps this output: its memory must never be written again
    kept_copy = kept.clone()
    first = memel(batches[2]).data_ptr()
    assert first != kept.data_ptr()
    assert memel(batches[3]).data_ptr() == first  # the previous output is gone: its buffer comes back
    assert torch.equal(kept, kept_copy)


@needs_kernel
def test_two_forwards_before_one_backward_match_the_eager_path() -> None:
    """Gradient accumulation over two forwards: the first graph holds its pooled output meanwhile."""
    batches = _stream(6, [12] * 5, (3, 9))

    def run() -> list[torch.Tensor]:
        memel = MEmeL(n_forget=2, delta=2.0).train()
        grads = []
        for batch in batches[:2]:
            memel(batch)
        inputs = [batch.clone().requires_grad_(True) for batch in batches[2:4]]
        weights = [torch.linspace(-1, 1, 27).reshape(3, 9), torch.linspace(2, 0, 27).reshape(3, 9)]
        loss = sum(((memel(z) * w) ** 2).sum() for z, w in zip(inputs, weights))
        loss.backward()
        grads += [z.grad for z in inputs if z.grad is not None]
        return grads

    fused = run()
    with eager_only():
        eager = run()
    assert len(fused) == 2
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
