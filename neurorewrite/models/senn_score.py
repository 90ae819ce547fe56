"""SENN's scores: the K-FAC natural expansion score, the candidate lower bound, candidate search.

Notation of ``shared/METHODS.md`` section 3. For one linear layer ``s = W a`` (``a`` its input with a
trailing 1 for the bias), ``g = dL_i/ds`` per sample, ``A = E[a a^T]``, ``G`` the K-FAC output factor,
``dW = E[g a^T]``:

- ``eta = Tr(G^-1 dW A^-1 dW^T)``, the natural expansion score ``g^T F^-1 g`` with ``F = A (x) G``.
- A candidate input ``a_p`` (a new neuron feeding this layer through a zero weight) raises ``eta`` by at
  least ``Tr(G^-1 C^T A_p^-1 C)``, ``C = E[a_p g_r^T]``, ``g_r = g - dW A^-1 a``. (Exact gain uses the
  Schur complement ``A_p - E[a_p a^T] A^-1 E[a a_p^T] <= A_p``, hence a lower bound.)

Damping: ``G + g_damping * mean(diag G) I`` (METHODS) and ``A + a_damping * mean(diag A) I`` (ours, only
to keep ``A`` invertible; the same shift is added to ``A_p``). All statistics are float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neurorewrite.models.senn_data import loss_sum, output_fisher_vectors

_TINY = 1e-30


@dataclass(frozen=True)
class LayerFactors:
    """K-FAC statistics of one linear layer over a batch, and its natural expansion score ``eta``."""

    inputs: Tensor  # (n, d + 1), bias column last
    residual: Tensor  # (n, o), g_r
    g_inv: Tensor  # (o, o), inverse of the damped G
    a_shift: float  # absolute damping added to A's (and A_p's) diagonal
    eta: float


def with_bias(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def kfac_factors(inputs: Tensor, grads: Tensor, fisher_grads: Tensor, g_damping: float, a_damping: float) -> LayerFactors:
    """K-FAC factors of a layer from its inputs (n, d), loss gradients (n, o) and Fisher vectors (n, K, o).

    The two big covariance products run in the inputs' dtype (float32 for a float32 network: they
    dominate the cost); everything after them is float64.
    """
    n = inputs.shape[0]
    a_low = with_bias(inputs.detach())
    fisher_low = fisher_grads.detach().reshape(-1, grads.shape[1]).to(a_low.dtype)
    a_cov = (a_low.T @ a_low).double() / n
    g_cov = (fisher_low.T @ fisher_low).double() / n
    a, g = a_low.double(), grads.detach().double()
    a_shift = a_damping * float(a_cov.diagonal().mean())
    a_damped = a_cov + a_shift * torch.eye(a.shape[1], dtype=a.dtype)
    g_shift = max(g_damping * float(g_cov.diagonal().mean()), _TINY)
    g_inv = torch.cholesky_inverse(torch.linalg.cholesky(g_cov + g_shift * torch.eye(g.shape[1], dtype=g.dtype)))
    d_w = g.T @ a / n
    d_w_a_inv = torch.linalg.solve(a_damped, d_w.T).T  # dW A^-1 (A symmetric)
    eta = float(((g_inv @ d_w_a_inv) * d_w).sum())
    residual = g - a @ d_w_a_inv.T
    return LayerFactors(inputs=a, residual=residual, g_inv=g_inv, a_shift=a_shift, eta=eta)


def candidate_lower_bound(factors: LayerFactors, activations: Tensor) -> Tensor:
    """Lower bound on the gain in ``eta`` of each candidate column of ``activations`` (n, K) -> (K,)."""
    n = activations.shape[0]
    c = activations.T @ factors.residual / n  # (K, o)
    numerator = ((c @ factors.g_inv) * c).sum(dim=1)
    a_p = (activations * activations).mean(dim=0) + factors.a_shift
    return numerator / a_p.clamp_min(_TINY)


@dataclass(frozen=True)
class RecordedBatch:
    """Per-layer factors of a network on one batch, plus ``E||dL/dy||^2`` for the absolute threshold."""

    layers: list[LayerFactors]
    sources: list[Tensor]  # input of each linear layer, float64, no bias column
    output_grad_sq: float


def record_factors(
    sources: Sequence[Tensor],
    preacts: Sequence[Tensor],
    target: Tensor,
    loss: str,
    fisher: str,
    g_damping: float,
    a_damping: float,
) -> RecordedBatch:
    """Factors of every linear layer, from a recorded forward pass (``preacts[-1]`` is the output).

    One backward pass for the loss gradients, plus one per Fisher vector column (``O`` for
    ``gauss_newton``; none extra for ``empirical``).
    """
    output = preacts[-1]
    grads = torch.autograd.grad(loss_sum(output, target, loss), list(preacts), retain_graph=True)
    vectors = output_fisher_vectors(output, target, loss, fisher)
    if fisher == "empirical":
        fisher_grads = [grad[:, None, :] for grad in grads]
    else:
        # One backward per Fisher column; measured faster here than one vmapped (is_grads_batched) pass.
        columns = [
            torch.autograd.grad(output, list(preacts), grad_outputs=vectors[:, :, k].to(output.dtype), retain_graph=True)
            for k in range(vectors.shape[2])
        ]
        fisher_grads = [torch.stack([col[i] for col in columns], dim=1) for i in range(len(preacts))]
    layers = [
        kfac_factors(src, grad, fg, g_damping, a_damping) for src, grad, fg in zip(sources, grads, fisher_grads)
    ]
    output_grad_sq = float((grads[-1].double() ** 2).sum(dim=1).mean())
    return RecordedBatch(layers=layers, sources=[s.detach().double() for s in sources], output_grad_sq=output_grad_sq)


@dataclass(frozen=True)
class Candidate:
    """The best new neuron found: incoming weights, bias and its lower-bound gain."""

    weight: Tensor  # (d,)
    bias: Tensor  # scalar
    gain: float


def search_candidates(
    source: Tensor,
    factors: LayerFactors,
    activation: Callable[[Tensor], Tensor],
    count: int,
    steps: int,
    lr: float,
    generator: torch.Generator,
) -> Candidate:
    """Sample ``count`` candidate neurons on ``source`` (n, d), ascend their lower bound, keep the best.

    Candidates start with preactivations spread over about [-2, 2] around the source's mean, so the
    activation's nonlinearity is in play; Adam then ascends every candidate's bound independently.
    """
    n, d = source.shape
    mean, std = source.mean(dim=0), source.std(dim=0).clamp_min(1e-6) if n > 1 else source.new_ones(d)
    weight = torch.randn(count, d, generator=generator, dtype=source.dtype) * (2.0 / (d**0.5 * std))
    offset = (torch.rand(count, generator=generator, dtype=source.dtype) * 4.0) - 2.0
    bias = offset - weight @ mean
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)

    def gains() -> Tensor:
        return candidate_lower_bound(factors, activation(source @ weight.T + bias))

    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            (-gains().sum()).backward()
            optimizer.step()
    with torch.no_grad():
        final = gains()
        final = torch.where(torch.isfinite(final), final, torch.zeros_like(final))
        best = int(final.argmax())
        return Candidate(weight=weight[best].detach().clone(), bias=bias[best].detach().clone(), gain=float(final[best]))
