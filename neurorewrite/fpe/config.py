"""Options of an FPE expansion and the counting rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.checks import integer_at_least
from neurorewrite.errors import InvalidOptionError

SPLITS = ("random", "feature", "groups", "shared", "blocks", "tiered")
ONE_PARTITION_SPLITS = ("blocks", "shared", "feature")  # every neuron uses the same input partition
BIAS_MODES = ("copy", "split")
PRUNE_MODES = ("global", "layer")
# the tiered split's share of each neuron's inputs for its first child when a sample is given: on
# all-MiniLM-L6-v2, calibrated, the mean cosine rises from 0.951 (balanced) to 0.972 / 0.982 / 0.986 / 0.987 /
# 0.986 at 0.375 / 0.5 / 0.625 / 0.75 / 0.875 (alpha 4; docs/methods.md 1.3c)
DEFAULT_LEAD_SHARE = 0.75


def check_alpha(alpha: object, minimum: int = 1) -> int:
    """Return ``alpha`` as an int, or raise if it is not an integer >= ``minimum`` (2.0 counts as 2)."""
    return integer_at_least("--alpha", alpha, minimum, accept_whole_floats=True)


@dataclass(frozen=True)
class FPEConfig:
    """Options of one expansion. ``groups`` is only read by ``split="groups"``."""

    alpha: int
    split: str = "random"
    seed: int = 0
    bias: str = "split"
    prune: str = "global"
    groups: tuple[tuple[int, ...], ...] | None = None
    lead_share: float | None = None  # tiered split: child 0's share of each neuron's inputs (None: balanced)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        for name, value, allowed in (
            ("split", self.split, SPLITS),
            ("bias", self.bias, BIAS_MODES),
            ("prune", self.prune, PRUNE_MODES),
        ):
            if value not in allowed:
                raise InvalidOptionError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.split == "groups" and self.groups is None:
            raise InvalidOptionError("--split groups needs a partition: pass --groups FILE.json")
        if self.lead_share is not None:
            share = self.lead_share
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
                raise InvalidOptionError(f"--lead-share must be a number between 0 and 1 (exclusive), got {share!r}")
            if self.split != "tiered":
                raise InvalidOptionError(f"--lead-share shapes the tiered split; with --split {self.split} leave it "
                                         "out or add --split tiered")
            object.__setattr__(self, "lead_share", float(share))


def structured_split(split: str, where: str = "--structured") -> str:
    """The split of the ``--structured`` preset: ``split`` when it gives one partition for all neurons,
    ``blocks`` for the default ``random`` (contiguous input blocks need no gather at run time)."""
    if split == "random":
        return "blocks"
    if split not in ONE_PARTITION_SPLITS:
        raise InvalidOptionError(
            f"{where} needs one input partition for all neurons (split {', '.join(ONE_PARTITION_SPLITS)}), got {split!r}"
        )
    return split


def block_seed(seed: int, position: int) -> int:
    """The seed of the ``position``-th expanded block of a model: blocks get independent streams,
    and the ONNX pass and the torch module derive them the same way."""
    return int(np.random.SeedSequence((seed, position)).generate_state(1)[0])


def block_nnz(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None) -> int:
    """Nonzero count of a block under the module's counting rule."""
    return sum(int(np.count_nonzero(a)) for a in (w1, b1, w2, b2) if a is not None)


# --- splitting -----------------------------------------------------------------------------------
