"""The options of a Self-Expanding Neural Network (SENN) and their validation.

One frozen dataclass, :class:`SENNConfig`, holds every growth option (thresholds, cooldown, candidate
search, damping, size caps). Each field is checked once, at construction, and a bad value raises
:class:`~neurorewrite.errors.InvalidOptionError` naming the field and its allowed range. The math the
options steer is in ``shared/METHODS.md`` section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from neurorewrite.checks import finite_number, integer_at_least
from neurorewrite.errors import InvalidOptionError

FISHERS = ("gauss_newton", "empirical")
TAU_REFERENCES = ("layer", "total")
LOSSES = ("mse", "cross_entropy")

# The rational activation (v, c, l) that hidden and new nonlinear neurons start from: 2x/(1+x^2), odd,
# bounded, with no linear tail. Measured on the 1-D regression benchmark it grows and fits better than
# (1, 0, 1), whose linear part the candidate bound's A_p penalises. (0, 0, 1) is the identity used by a
# freshly inserted layer.
NONLINEAR_INIT = (1.0, 0.0, 0.0)
IDENTITY_INIT = (0.0, 0.0, 1.0)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= ``minimum``."""
    return integer_at_least(f"SENN option {name}", value, minimum)


def check_nonnegative_float(name: str, value: object, strictly_positive: bool = False) -> float:
    """Return ``value`` as a finite float >= 0 (> 0 if ``strictly_positive``), or raise."""
    return finite_number(f"SENN option {name}", value, minimum=0.0, strictly_positive=strictly_positive)


@dataclass(frozen=True)
class SENNConfig:
    """When, where and what a :class:`~neurorewrite.models.senn.SelfExpandingMLP` grows.

    ``tau`` is the relative threshold: gain over the consuming layer's own score ``eta_l``
    (``tau_reference="layer"``, METHODS) or over the whole network's K-FAC score (``"total"``); ``alpha_abs`` the
    absolute one (gain over ``E||dL/dy||^2``); both must pass. ``cooldown`` is the number of epochs
    between two scorings. Each scoring adds up to ``max_additions`` neurons/layers, rescoring after each.
    ``fisher="gauss_newton"`` builds the K-FAC output factor G from the model's output Fisher (exact for
    squared error, ``diag(p) - pp^T`` for cross entropy); ``"empirical"`` from the observed gradients.
    ``g_damping`` (relative to mean diag G) is the METHODS damping; ``a_damping`` (relative to mean
    diag A) only keeps A invertible. Depth proposals must beat the best width proposal by
    ``depth_margin`` (a new layer costs far more parameters than a neuron). ``sync_ranks`` (with a
    ``torch.distributed`` process group): score on the union of the ranks' data and decide as rank 0
    does, and train under DistributedDataParallel in ``fit``; False keeps every rank's network its own.
    """

    tau: float = 1.0
    alpha_abs: float = 2.5e-3
    cooldown: int = 10
    max_additions: int = 4
    candidates: int = 16
    search_steps: int = 30
    search_lr: float = 0.05
    g_damping: float = 0.1
    a_damping: float = 1e-4
    fisher: str = "gauss_newton"
    tau_reference: str = "layer"
    max_width: int = 256
    max_hidden_layers: int = 4
    allow_width: bool = True
    allow_depth: bool = True
    depth_margin: float = 2.0
    score_batch_size: int = 1024
    seed: int = 0
    sync_ranks: bool = True

    def __post_init__(self) -> None:
        check_nonnegative_float("tau", self.tau)
        check_nonnegative_float("alpha_abs", self.alpha_abs)
        check_nonnegative_float("search_lr", self.search_lr, strictly_positive=True)
        check_nonnegative_float("g_damping", self.g_damping)
        check_nonnegative_float("a_damping", self.a_damping)
        check_nonnegative_float("depth_margin", self.depth_margin)
        check_positive_int("cooldown", self.cooldown)
        check_positive_int("max_additions", self.max_additions)
        check_positive_int("candidates", self.candidates)
        check_positive_int("search_steps", self.search_steps, minimum=0)
        check_positive_int("max_width", self.max_width)
        check_positive_int("max_hidden_layers", self.max_hidden_layers, minimum=0)
        check_positive_int("score_batch_size", self.score_batch_size)
        check_positive_int("seed", self.seed, minimum=0)
        if not isinstance(self.sync_ranks, bool):
            raise InvalidOptionError(f"SENN option sync_ranks must be True or False, got {self.sync_ranks!r}")
        if self.fisher not in FISHERS:
            raise InvalidOptionError(f"SENN option fisher must be one of {FISHERS}, got {self.fisher!r}")
        if self.tau_reference not in TAU_REFERENCES:
            raise InvalidOptionError(
                f"SENN option tau_reference must be one of {TAU_REFERENCES}, got {self.tau_reference!r}"
            )
