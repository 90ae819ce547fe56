"""SENN rejects bad options and mismatched data with typed errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import fit


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(tau=-1.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(alpha_abs=-0.1), "alpha_abs"),
        (dict(alpha_abs="big"), "alpha_abs"),
        (dict(cooldown=0), "cooldown"),
        (dict(cooldown=1.5), "cooldown"),
        (dict(candidates=0), "candidates"),
        (dict(max_width=0), "max_width"),
        (dict(search_lr=0.0), "search_lr"),
        (dict(fisher="exact"), "fisher"),
        (dict(tau_reference="global"), "tau_reference"),
    ],
)
def test_invalid_config_names_the_option(options: dict, named: str) -> None:
    with pytest.raises(InvalidOptionError, match=named):
        SENNConfig(**options)


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((0, 1), {}, "in_features"),
        ((2, 0), {}, "out_features"),
        ((2, 1, [4, 0]), {}, r"hidden\[1\]"),
        ((2, 1, [4, -3]), {}, r"hidden\[1\]"),
        ((2, 1, "16"), {}, "hidden"),
        ((2, 1, [True]), {}, r"hidden\[0\]"),
        ((2, 1), {"loss": "hinge"}, "loss"),
        ((2, 1), {"activation_init": (0.0, 0.0, 0.0)}, "activation_init"),
    ],
)
def test_invalid_model_options(args: tuple, kwargs: dict, named: str) -> None:
    with pytest.raises(InvalidOptionError, match=named):
        SelfExpandingMLP(*args, **kwargs)


@pytest.mark.parametrize(
    ("x", "y", "loss", "named"),
    [
        (torch.randn(8, 3), torch.randn(8, 1), "mse", "in_features"),
        (torch.randn(8), torch.randn(8, 1), "mse", "in_features"),
        (torch.randn(8, 2), torch.randn(8, 3), "mse", "out_features"),
        (torch.randn(8, 2), torch.randn(7, 1), "mse", "same nonzero number of samples"),
        (torch.randint(0, 2, (8, 2)), torch.randn(8, 1), "mse", "floating point"),
        (torch.full((8, 2), float("nan")), torch.randn(8, 1), "mse", "NaN"),
        (torch.randn(8, 2), torch.tensor([0, 1, 2, 0, 1, 0, 0, 1]), "cross_entropy", r"\[0, 2\)"),
        (torch.randn(8, 2), torch.rand(8), "cross_entropy", "integer class labels"),
        ([[0.0, 1.0]], torch.randn(1, 1), "mse", "torch tensors"),
    ],
)
def test_data_mismatch_raises_data_error(x: object, y: object, loss: str, named: str) -> None:
    out = 2 if loss == "cross_entropy" else 1
    net = SelfExpandingMLP(2, out, [3], loss=loss)
    with pytest.raises(DataError, match=named):
        net.maybe_grow(x, y, 0)
    with pytest.raises(DataError, match=named):
        fit(net, x, y, epochs=1)


def test_bad_growth_positions_and_fit_options() -> None:
    net = SelfExpandingMLP(2, 1, [3])
    with pytest.raises(InvalidOptionError, match="hidden layer 1"):
        net.grow_width(1, torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(InvalidOptionError, match="position 5"):
        net.grow_depth(5, torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(InvalidOptionError, match="epochs"):
        fit(net, torch.randn(4, 2), torch.randn(4, 1), epochs=0)
    with pytest.raises(InvalidOptionError, match="lr"):
        fit(net, torch.randn(4, 2), torch.randn(4, 1), epochs=1, lr=-1.0)
