"""SENN scores against brute force on tiny networks.

Which Fisher each comparison matches: for a one-layer linear model with squared error, the per-sample
Jacobian of y wrt vec(W, b) is ``J_i = a_i^T (x) I_O``, so the Gauss-Newton Fisher ``E[J_i^T J_i]`` is
exactly ``A (x) I`` and the K-FAC factor G (``fisher="gauss_newton"``) is ``I``. With SENN's damping,
``(A + lam I) (x) (I + 0.1 I)``, the K-FAC score equals the exact ``g^T ((1 + 0.1)(J^T J / n + lam I))^-1 g``
with ``lam = a_damping * mean(diag A)``. The same brute force, run on the model with one extra input,
gives the exact gain that the candidate lower bound must not exceed (and must equal when the candidate
is uncorrelated with the existing inputs).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_data import loss_sum, output_fisher_vectors
from neurorewrite.models.senn_layers import rational
from neurorewrite.models.senn_score import candidate_lower_bound, kfac_factors, record_factors, search_candidates

torch.set_num_threads(1)
G_DAMPING, A_DAMPING = 0.1, 1e-3


def _linear_problem(n: int = 40, d: int = 3, o: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, o, generator=gen, dtype=torch.float64)
    layer = torch.nn.Linear(d, o).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(o, d, generator=gen))
        layer.bias.copy_(torch.randn(o, generator=gen))
    return layer, x, y


def _brute_force_eta(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, lam: float) -> float:
    """``g^T ((1 + G_DAMPING)(J^T J / n + lam I))^-1 g`` with explicit per-sample Jacobians."""
    params = {k: v.detach() for k, v in layer.named_parameters()}
    n = x.shape[0]

    def flat_out(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, p, (xi[None],))[0]

    jac = torch.vmap(jacrev(flat_out), in_dims=(None, 0))(params, x)
    j = torch.cat([jac["weight"].reshape(n, y.shape[1], -1), jac["bias"].reshape(n, y.shape[1], -1)], dim=2)
    j = j.reshape(n * y.shape[1], -1)
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    mean_loss = loss_sum(functional_call(layer, live, (x,)), y, "mse") / n
    grads = torch.autograd.grad(mean_loss, [live["weight"], live["bias"]])
    g = torch.cat([grads[0].reshape(-1), grads[1].reshape(-1)])
    fisher = (1 + G_DAMPING) * (j.T @ j / n + lam * torch.eye(j.shape[1], dtype=j.dtype))
    return float(g @ torch.linalg.solve(fisher, g))


def _factors(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor):
    s = layer(x)
    return record_factors([x], [s], y, "mse", "gauss_newton", G_DAMPING, A_DAMPING).layers[0]


def test_kfac_score_equals_exact_gauss_newton_score_of_a_linear_layer() -> None:
    layer, x, y = _linear_problem()
    factors = _factors(layer, x, y)
    lam = factors.a_shift
    assert lam == pytest.approx(A_DAMPING * float((torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) ** 2).mean(0).mean()))
    assert factors.eta == pytest.approx(_brute_force_eta(layer, x, y, lam), rel=1e-9)


def _layer_with_extra_input(layer: torch.nn.Linear) -> torch.nn.Linear:
    wider = torch.nn.Linear(layer.in_features + 1, layer.out_features).double()
    with torch.no_grad():
        wider.weight.copy_(torch.cat([layer.weight, torch.zeros(layer.out_features, 1, dtype=torch.float64)], 1))
        wider.bias.copy_(layer.bias)
    return wider


@pytest.mark.parametrize("orthogonal", [False, True])
def test_candidate_bound_against_exact_gain(orthogonal: bool) -> None:
    layer, x, y = _linear_problem(seed=1)
    factors = _factors(layer, x, y)
    candidate = torch.tanh(x @ torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64) + 0.2)
    if orthogonal:
        # Remove the part explained by [x, 1]: then E[a a_p] = 0 and the Schur complement is A_p itself.
        a = factors.inputs
        candidate = candidate - a @ torch.linalg.lstsq(a, candidate[:, None]).solution[:, 0]
    bound = float(candidate_lower_bound(factors, candidate[:, None])[0])
    wider = _layer_with_extra_input(layer)
    exact = _brute_force_eta(wider, torch.cat([x, candidate[:, None]], 1), y, factors.a_shift) - factors.eta
    assert bound > 0
    if orthogonal:
        assert bound == pytest.approx(exact, rel=1e-8)
    else:
        assert bound <= exact * (1 + 1e-9)
        assert bound < 0.999 * exact  # the bound is loose here, so the test really compares two things


def test_candidate_in_span_of_inputs_gains_nothing() -> None:
    # Without A damping the residual gradient is exactly orthogonal to [x, 1], so a candidate in their
    # span captures nothing new.
    layer, x, y = _linear_problem(seed=2)
    factors = record_factors([x], [layer(x)], y, "mse", "gauss_newton", G_DAMPING, 0.0).layers[0]
    in_span = (x @ torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64) + 3.0)[:, None]
    assert float(candidate_lower_bound(factors, in_span)[0]) < 1e-12 * float((in_span**2).mean())


def test_cross_entropy_fisher_vectors_reproduce_the_softmax_hessian() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 2])
    m = output_fisher_vectors(logits, labels, "cross_entropy", "gauss_newton")
    for i in range(5):
        hessian = torch.func.hessian(lambda z: loss_sum(z[None], labels[i : i + 1], "cross_entropy"))(logits[i])
        torch.testing.assert_close(m[i] @ m[i].T, hessian, rtol=1e-10, atol=1e-12)


def test_kfac_layer_score_uses_damped_g() -> None:
    layer, x, y = _linear_problem(seed=4)
    undamped = kfac_factors(x, layer(x) - y, torch.eye(2, dtype=torch.float64).expand(len(x), 2, 2), 0.0, A_DAMPING)
    damped = kfac_factors(x, layer(x) - y, torch.eye(2, dtype=torch.float64).expand(len(x), 2, 2), G_DAMPING, A_DAMPING)
    assert damped.eta == pytest.approx(undamped.eta / (1 + G_DAMPING), rel=1e-12)


def test_candidate_search_raises_the_bound() -> None:
    torch.manual_seed(0)
    net = SelfExpandingMLP(1, 1, [2], config=SENNConfig())
    x = torch.linspace(-1, 1, 200)[:, None]
    y = torch.sin(6 * x)
    sources, preacts = net.forward_recording(x)
    recorded = record_factors(sources, preacts, y, "mse", "gauss_newton", G_DAMPING, A_DAMPING)
    v, c, l = (torch.tensor(p, dtype=torch.float64) for p in net.activation_init)  # noqa: E741

    def activation(z: torch.Tensor) -> torch.Tensor:
        return rational(z, v, c, l)

    gains = [
        search_candidates(recorded.sources[0], recorded.layers[1], activation, 8, steps, 0.05, torch.Generator().manual_seed(5)).gain
        for steps in (0, 40)
    ]
    assert gains[1] > 1.05 * gains[0]
