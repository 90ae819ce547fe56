"""MEmeL benchmark: what it does to accuracy and to the monosemantic scale.

Digits: a 64-64-64-10 ReLU MLP on sklearn's ``load_digits`` (75/25 stratified split, inputs
standardised), Adam, trained with plain training and with MEmeL after both hidden ReLUs as naive (a)
delta=0, naive (b) delta=-1 and RD delta=1 (top_t=1, n_forget=10), 5 seeds each (a seed fixes the
initial weights and batch order for all variants, so differences are paired). Reported: test
accuracy (mean +- sample std over seeds), its per-seed difference to plain training, and the
monosemantic scale of the trained models' hidden layers on
test data: phi of every test activation against the train-set mean and variance of that element
(MEmeL's own formula, statistics from one pass over the train set).

What MEmeL costs per step (a 4-layer MLP and a transformer encoder layer) is ``benchmarks/memel_cost.py``.

Run: ``.venv/bin/python -m benchmarks.memel`` from the repository root.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from benchmarks.machine import describe
from neurorewrite.models.memel import MEmeL, insert_memel, remove_memel

SEEDS = (0, 1, 2, 3, 4)
EPOCHS, BATCH, HIDDEN = 40, 32, 64
VARIANTS: tuple[tuple[str, float | None], ...] = (
    ("plain", None), ("naive (a) delta=0", 0.0), ("naive (b) delta=-1", -1.0), ("RD delta=1", 1.0),
)
HIDDEN_LAYERS = ("1", "3")  # the ReLUs of nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)
PHI_LEVEL = 9.0


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    scaler = StandardScaler().fit(x_train)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


def _train_digits(seed: int, delta: float | None, data: tuple[torch.Tensor, ...]) -> nn.Sequential:
    x_train, y_train = data[0], data[1]
    torch.manual_seed(seed)
    model = _mlp([64, HIDDEN, HIDDEN, 10])
    if delta is not None:
        insert_memel(model, after=list(HIDDEN_LAYERS), top_t=1, delta=delta, n_forget=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x_train), generator=order).split(BATCH):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return remove_memel(model).eval()


def _hidden(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model[: int(name) + 1](x) for name in HIDDEN_LAYERS]


def _phi_summary(model: nn.Sequential, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """phi of the test activations of both hidden layers against their train-set statistics."""
    phis = []
    for train_h, test_h in zip(_hidden(model, data[0]), _hidden(model, data[2])):
        reference = MEmeL(n_forget=1).train()
        reference(train_h)  # one batch, n_forget=1: the exact train-set mean and variance
        phis.append(reference.monosemantic_scale(test_h))
    phi = torch.cat(phis, dim=1)
    return {
        "phi mean": phi.mean().item(),
        "phi p99": phi.flatten().quantile(0.99).item(),
        "max phi/sample": phi.max(dim=1).values.mean().item(),
        f"% phi>{PHI_LEVEL:g}": (phi > PHI_LEVEL).float().mean().item() * 100,
    }


def _cell(values: list[float], digits: int) -> str:
    return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}"


def digits_table() -> None:
    data = _digits()
    columns = ["test acc %", "acc - plain (same seed)", "phi mean", "phi p99", "max phi/sample", f"% phi>{PHI_LEVEL:g}"]
    print(f"digits: MLP 64-{HIDDEN}-{HIDDEN}-10, {EPOCHS} epochs, batch {BATCH}, Adam 1e-3, seeds {SEEDS} (a seed fixes"
          " init and batch order for every variant); MEmeL top_t=1, n_forget=10 after both hidden ReLUs;"
          " mean +- sample std over seeds; phi of both hidden layers on the test set vs train-set statistics")
    print(f"| variant | {' | '.join(columns)} |")
    print("|" + "---|" * (len(columns) + 1))
    plain_accuracy: list[float] = []
    for label, delta in VARIANTS:
        rows: dict[str, list[float]] = {column: [] for column in columns}
        for seed in SEEDS:
            model = _train_digits(seed, delta, data)
            with torch.no_grad():
                accuracy = (model(data[2]).argmax(1) == data[3]).float().mean().item() * 100
            rows["test acc %"].append(accuracy)
            for key, value in _phi_summary(model, data).items():
                rows[key].append(value)
        if delta is None:
            plain_accuracy = rows["test acc %"]
        rows["acc - plain (same seed)"] = [a - p for a, p in zip(rows["test acc %"], plain_accuracy)]
        cells = [_cell(v, 2 if column.startswith(("test", "acc")) else 3) for column, v in rows.items()]
        print(f"| {label} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    print(describe())
    digits_table()
    print("\nstep cost: python -m benchmarks.memel_cost")


if __name__ == "__main__":
    main()
