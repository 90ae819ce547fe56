"""MEmeL module math: running statistics against numpy, selection, Reversed Deactivation, eval, state."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models.memel import MEmeL, first_argmax_, reversed_deactivation


def _batches(seed: int, sizes: list[int], shape: tuple[int, ...] = (3, 4)) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    # Heavy-tailed, shifted data so that the mean is far from zero and a few elements stand out.
    return [torch.tensor(rng.standard_t(3, size=(n, *shape)) + 5.0, dtype=torch.float32) for n in sizes]


def _numpy_running_stats(batches: list[np.ndarray], n_forget: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Reference: pooled first and second moments, old statistics worth at most (n_forget-1) batches."""
    count, mean, second = 0.0, 0.0, 0.0
    for batch in batches:
        x = batch.reshape(batch.shape[0], -1).astype(np.float64)
        weight = min(count, (n_forget - 1) * x.shape[0])
        total = weight + x.shape[0]
        second = (weight * second + (x**2).sum(0)) / total
        mean = (weight * mean + x.sum(0)) / total
        count = total
    return count, mean, (second - mean**2) * count / (count - 1)


def test_statistics_before_the_cap_are_the_sample_mean_and_variance_of_everything_seen() -> None:
    memel = MEmeL(n_forget=6).train()
    batches = _batches(0, [16, 16, 9, 16])
    for batch in batches:
        memel(batch)
    everything = torch.cat(batches).reshape(57, -1).double().numpy()
    assert memel.count == 57
    np.testing.assert_allclose(memel.mean.numpy(), everything.mean(0), rtol=1e-6)
    np.testing.assert_allclose(memel.variance.numpy(), everything.var(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("n_forget", [1, 3, 10])
def test_running_statistics_match_numpy_over_a_stream_with_the_capped_counter(n_forget: int) -> None:
    memel = MEmeL(n_forget=n_forget).train()
    batches = _batches(1, [32] * 12 + [7, 32, 32])
    for seen in range(1, len(batches) + 1):
        memel(batches[seen - 1])
        count, mean, variance = _numpy_running_stats([b.numpy() for b in batches[:seen]], n_forget)
        assert memel.count == count
        np.testing.assert_allclose(memel.mean.numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(memel.variance.numpy(), variance, rtol=1e-4)
    assert memel.batches_seen == len(batches)


def test_no_inhibition_before_n_forget_batches() -> None:
    memel = MEmeL(n_forget=4).train()
    batches = _batches(2, [8] * 5)
    for batch in batches[:4]:
        assert torch.equal(memel(batch), batch)
    assert not torch.equal(memel(batches[4]), batches[4])


@pytest.mark.parametrize("top_t", [1, 3])
def test_selected_elements_are_the_top_t_phi_per_sample_and_take_the_running_mean(top_t: int) -> None:
    memel = MEmeL(top_t=top_t, n_forget=3).train()
    batches = _batches(3, [20] * 4)
    for batch in batches[:3]:
        memel(batch)
    mean_before = memel.mean.clone().numpy()
    mean = memel.mean.double().numpy()
    variance = memel.variance.double().numpy()
    z = batches[3].reshape(20, -1).double().numpy()
    phi = (z - mean) ** 2 / (variance + 0.01 * variance.mean())
    expected_selected = np.argsort(-phi, axis=1)[:, :top_t]

    out = memel(batches[3]).reshape(20, -1)
    changed = (out != batches[3].reshape(20, -1)).numpy()
    assert changed.sum(1).tolist() == [top_t] * 20
    for row in range(20):
        assert set(np.flatnonzero(changed[row])) == set(expected_selected[row])
        # Exactly the running mean from before this batch (float32, the statistics' dtype).
        np.testing.assert_array_equal(out[row, expected_selected[row]].numpy(), mean_before[expected_selected[row]])


@pytest.mark.parametrize("delta", [1.0, 0.0, -1.0, 2.5])
def test_gradient_of_a_selected_element_is_minus_delta_times_the_upstream_gradient(delta: float) -> None:
    memel = MEmeL(delta=delta, n_forget=2).train()
    batches = _batches(4, [10] * 3)
    for batch in batches[:2]:
        memel(batch)
    z = batches[2].clone().requires_grad_(True)
    out = memel(z)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * upstream).sum().backward()
    selected = (out != z).detach()
    assert selected.sum().item() == 10
    assert z.grad is not None
    torch.testing.assert_close(z.grad[selected], -delta * upstream[selected])
    torch.testing.assert_close(z.grad[~selected], upstream[~selected])


def test_reversed_deactivation_equals_the_papers_formula_in_value_and_gradient() -> None:
    """z' = -D*z + (mu + D*z).detach() on the selected elements, written literally, against ours."""
    delta = 1.7
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    selected = torch.tensor([[0, 2], [1, 5], [3, 4], [0, 1], [5, 2]])
    running_mean = torch.randn(6, dtype=torch.float64)
    upstream = torch.randn(5, 6, dtype=torch.float64)
    mask = torch.zeros(5, 6, dtype=torch.bool).scatter_(1, selected, True)
    literal = torch.where(mask, -delta * z + (running_mean + delta * z).detach(), z)
    (literal_grad,) = torch.autograd.grad((literal * upstream).sum(), z)
    ours = reversed_deactivation(z, selected, running_mean[selected], delta)
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), z)
    torch.testing.assert_close(ours, literal)
    torch.testing.assert_close(ours_grad, literal_grad)


def test_eval_mode_is_the_identity_and_updates_nothing() -> None:
    memel = MEmeL(n_forget=1).train()
    batches = _batches(5, [8, 8])
    memel(batches[0])
    mean, m2, extra = memel.mean.clone(), memel.m2.clone(), memel.get_extra_state()
    memel.eval()
    assert memel(batches[1]) is batches[1]
    assert torch.equal(memel.mean, mean) and torch.equal(memel.m2, m2) and memel.get_extra_state() == extra


def test_state_dict_round_trip_into_a_fresh_module_continues_identically() -> None:
    memel = MEmeL(n_forget=2).train()
    batches = _batches(6, [12] * 4)
    for batch in batches[:3]:
        memel(batch)
    fresh = MEmeL(n_forget=2).train()
    fresh.load_state_dict(memel.state_dict())
    assert set(memel.state_dict()) == {"mean", "m2", "_extra_state"}
    assert torch.equal(fresh(batches[3]), memel(batches[3]))
    assert torch.equal(fresh.m2, memel.m2)


@pytest.mark.parametrize(
    "options, option_name",
    [({"top_t": 0}, "top_t"), ({"top_t": 1.5}, "top_t"), ({"top_t": True}, "top_t"), ({"n_forget": 0}, "n_forget"),
     ({"n_forget": "10"}, "n_forget"), ({"delta": float("nan")}, "delta")],
)
def test_invalid_options_raise_an_error_naming_the_option(options: dict[str, object], option_name: str) -> None:
    with pytest.raises(InvalidOptionError, match=option_name):
        MEmeL(**options)  # type: ignore[arg-type]


def test_activation_errors_name_the_layer() -> None:
    memel = MEmeL(top_t=13, name="encoder.layer.4").train()
    with pytest.raises(InvalidOptionError, match=r"top_t=13 .*encoder\.layer\.4"):
        memel(torch.randn(4, 3, 4))
    with pytest.raises(InvalidOptionError, match="encoder.layer.4"):
        memel(torch.randn(4))
    ok = MEmeL(name="encoder.layer.4").train()
    ok(torch.randn(4, 12))
    with pytest.raises(InvalidOptionError, match="feature shape must stay fixed"):
        ok(torch.randn(4, 13))


def test_first_argmax_matches_argmax_including_ties_and_survives_nan() -> None:
    values = torch.tensor(
        [[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0],
         [1.0, 1.0 + 2**-23, 1.0, 0.5], [float("nan"), 1, 2, 3]]
    )
    expected = values[:5].argmax(dim=1, keepdim=True)
    found = first_argmax_(values.clone())
    assert torch.equal(found[:5], expected)
    assert 0 <= found[5].item() < 4
    random = torch.rand(64, 300, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first_argmax_(random.clone()), random.argmax(dim=1, keepdim=True))


def test_a_dead_layer_that_wakes_up_gives_finite_selections() -> None:
    memel = MEmeL(n_forget=2).train()
    for _ in range(2):
        memel(torch.zeros(4, 6))
    z = torch.zeros(4, 6)
    z[:, 3] = 1e6
    out = memel(z)
    assert torch.isfinite(out).all() and torch.equal(out[:, 3], torch.zeros(4))


def test_monosemantic_scale_is_the_papers_phi_against_the_running_statistics() -> None:
    memel = MEmeL(n_forget=5).train()
    batches = _batches(7, [24] * 3)
    for batch in batches[:2]:
        memel(batch)
    seen = torch.cat(batches[:2]).reshape(48, -1).double().numpy()
    mean, variance = seen.mean(0), seen.var(0, ddof=1)
    z = batches[2].reshape(24, -1).double().numpy()
    expected = (z - mean) ** 2 / (variance + 0.01 * variance.mean())
    np.testing.assert_allclose(memel.monosemantic_scale(batches[2]).numpy(), expected, rtol=1e-4, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.one_of(st.integers(0, 3).map(float), st.floats(0, 2.0**100, width=32)),
    )
)
def test_first_argmax_agrees_with_numpy_on_nonnegative_rows_with_ties(values: np.ndarray) -> None:
    found = first_argmax_(torch.from_numpy(values.copy()))
    np.testing.assert_array_equal(found.numpy()[:, 0], values.argmax(axis=1))


def test_an_empty_batch_changes_nothing() -> None:
    memel = MEmeL(n_forget=2).train()
    batches = _batches(8, [8, 8])
    for batch in batches:
        memel(batch)
    mean, m2, extra = memel.mean.clone(), memel.m2.clone(), memel.get_extra_state()
    assert memel(batches[0][:0]).shape == (0, 3, 4)
    assert torch.equal(memel.mean, mean) and torch.equal(memel.m2, m2) and memel.get_extra_state() == extra


def test_bfloat16_activations_keep_float32_statistics_and_their_dtype() -> None:
    memel = MEmeL(n_forget=2).train()
    batches = [batch.to(torch.bfloat16) for batch in _batches(9, [16] * 3)]
    for batch in batches[:2]:
        memel(batch)
    reference = MEmeL(n_forget=2).train()
    for batch in batches:
        reference(batch.float())
    z = batches[2].clone().requires_grad_(True)
    out = memel(z)
    out.float().sum().backward()
    assert memel.mean.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(memel.mean, reference.mean)
    assert z.grad is not None and (z.grad == -1).sum().item() == 16
