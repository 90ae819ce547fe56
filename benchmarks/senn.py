"""SENN demonstration: growth on 1-D regression and make_moons, and the cost of the score.

Run from the repository root: ``.venv/bin/python -m benchmarks.senn``. Single-threaded torch.

1. Regression: the target is a random tanh MLP 1 -> 16 -> 16 -> 16 -> 16 -> 1 (first layer weights and
   biases N(0, 10^2), hidden weights N(0, 3^2/16), output N(0, 1/16); about a dozen extrema on [-1, 1]).
   A SelfExpandingMLP starts at one hidden neuron with the default SENNConfig and trains 600 epochs
   (Adam 1e-2, batch 64, 512 samples); fixed networks of its final size train the same 600 epochs with
   the same loop and are compared on 1024 test points.
2. make_moons (noise 0.1): starts with no hidden layer, cross entropy, 150 epochs, cooldown 5.
3. Cost: one K-FAC scoring of all layers of an MLP with 256-wide hidden layers (plus the candidate
   bound of 16 candidates for the 256-wide consumer) against one Adam training step, same batch of 256.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from sklearn.datasets import make_moons

from benchmarks.machine import describe
from neurorewrite.models.senn import GrowthEvent, SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_data import loss_sum
from neurorewrite.models.senn_layers import rational
from neurorewrite.models.senn_score import candidate_lower_bound, record_factors, search_candidates
from neurorewrite.models.senn_train import fit, mean_loss

EPOCHS, LR, BATCH = 600, 1e-2, 64


def target_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    width = 1
    for i in range(4):
        linear = torch.nn.Linear(width, 16)
        torch.nn.init.normal_(linear.weight, std=10.0 if i == 0 else 3.0 / 16**0.5)
        torch.nn.init.normal_(linear.bias, std=10.0 if i == 0 else 0.5)
        layers += [linear, torch.nn.Tanh()]
        width = 16
    out = torch.nn.Linear(16, 1)
    torch.nn.init.normal_(out.weight, std=0.25)
    return torch.nn.Sequential(*layers, out)


def print_history(events: list[GrowthEvent]) -> None:
    print(f"{'epoch':>5} | {'event':<5} | {'layer':>5} | {'gain':>9} | {'eta ref':>9} | {'ratio':>7} | widths")
    for e in events:
        print(f"{e.epoch:>5} | {e.kind:<5} | {e.layer:>5} | {e.gain:9.3g} | {e.eta:9.3g} | {e.ratio:7.3g} | {list(e.widths)}")


def regression() -> None:
    gen = torch.Generator().manual_seed(0)
    target = target_mlp()
    x, x_test = torch.rand(512, 1, generator=gen) * 2 - 1, torch.rand(1024, 1, generator=gen) * 2 - 1
    with torch.no_grad():
        y, y_test = target(x), target(x_test)
    print(f"\n## 1-D regression (target variance {y_test.var().item():.4f}), start [1], {EPOCHS} epochs")
    torch.manual_seed(0)
    grown = SelfExpandingMLP(1, 1, [1])
    start = time.perf_counter()
    result = fit(grown, x, y, epochs=EPOCHS, batch_size=BATCH, lr=LR)
    grown_time = time.perf_counter() - start
    print_history(result.events)
    grown_loss = mean_loss(grown, x_test, y_test)
    fixed_losses = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        fixed = SelfExpandingMLP(1, 1, grown.widths)
        fit(fixed, x, y, epochs=EPOCHS, batch_size=BATCH, lr=LR, grow=False)
        fixed_losses.append(mean_loss(fixed, x_test, y_test))
    mean_fixed = statistics.mean(fixed_losses)
    print("\n| network | hidden widths | test loss (0.5*mse) | train time s |")
    print("|---|---|---|---|")
    print(f"| SENN grown from [1] | {grown.widths} | {grown_loss:.3g} | {grown_time:.1f} |")
    for seed, loss in zip((1, 2, 3), fixed_losses):
        print(f"| fixed, seed {seed} | {grown.widths} | {loss:.3g} | |")
    verdict = "PASS" if grown_loss <= 1.1 * mean_fixed else "FAIL"
    print(f"grown / mean fixed test loss = {grown_loss / mean_fixed:.3f} (target <= 1.10): {verdict}")


def moons() -> None:
    x_np, y_np = make_moons(600, noise=0.1, random_state=0)
    x, y = torch.tensor(x_np, dtype=torch.float32), torch.tensor(y_np)
    train, test = slice(0, 400), slice(400, 600)
    print("\n## make_moons, start with no hidden layer, 150 epochs, cooldown 5")
    torch.manual_seed(0)
    net = SelfExpandingMLP(2, 2, [], loss="cross_entropy", config=SENNConfig(cooldown=5))
    result = fit(net, x[train], y[train], epochs=150, batch_size=BATCH, lr=LR)
    print_history(result.events)
    torch.manual_seed(0)
    linear = SelfExpandingMLP(2, 2, [], loss="cross_entropy")
    fit(linear, x[train], y[train], epochs=150, batch_size=BATCH, lr=LR, grow=False)
    print("\n| network | hidden widths | test accuracy |")
    print("|---|---|---|")
    for name, model in (("SENN grown from []", net), ("linear (no growth)", linear)):
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"| {name} | {model.widths} | {accuracy:.3f} |")


def seconds_per_call(fn: Callable[[], object], repeats: int = 7, number: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def cost_case(in_features: int, out_features: int, loss: str, fisher: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    net = SelfExpandingMLP(in_features, out_features, [256, 256], loss=loss)
    x = torch.randn(256, in_features)
    y = torch.randint(0, out_features, (256,)) if loss == "cross_entropy" else torch.randn(256, out_features)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    v, c, l = (torch.tensor(p, dtype=torch.float64) for p in net.activation_init)  # noqa: E741
    candidates_w = torch.randn(256, 16, dtype=torch.float64)

    def train_step() -> None:
        optimizer.zero_grad()
        (loss_sum(net(x), y, loss) / 256).backward()
        optimizer.step()

    def score() -> float:
        sources, preacts = net.forward_recording(x)
        recorded = record_factors(sources, preacts, y, loss, fisher, 0.1, 1e-4)
        bound = candidate_lower_bound(recorded.layers[2], rational(recorded.sources[1] @ candidates_w, v, c, l))
        return float(bound.max())

    def search() -> None:
        sources, preacts = net.forward_recording(x)
        recorded = record_factors(sources, preacts, y, loss, fisher, 0.1, 1e-4)
        search_candidates(
            recorded.sources[1], recorded.layers[2], lambda z: rational(z, v, c, l), 16, 30, 0.05,
            torch.Generator().manual_seed(0),
        )

    return seconds_per_call(train_step), seconds_per_call(score), seconds_per_call(search, repeats=3, number=2)


def cost() -> None:
    print("\n## cost of the score, hidden [256, 256], batch 256 (median of 7 x 10 calls)")
    print("| model | fisher | train step ms | score ms | score / step | candidate search ms | search / step |")
    print("|---|---|---|---|---|---|---|")
    for in_f, out_f, loss, fisher in ((16, 1, "mse", "gauss_newton"), (32, 10, "cross_entropy", "gauss_newton"),
                                      (32, 10, "cross_entropy", "empirical")):
        step, score, search = cost_case(in_f, out_f, loss, fisher)
        print(f"| {in_f}->256->256->{out_f} {loss} | {fisher} | {step * 1e3:.2f} | {score * 1e3:.2f} | "
              f"{score / step:.2f} | {search * 1e3:.1f} | {search / step:.1f} |")
    print("score = forward + loss backward + Fisher backward(s) + K-FAC eta of all 3 layers + bound of 16 "
          "candidates on the 256-wide layer; target: score / step <= 10")


def main() -> None:
    torch.set_num_threads(1)
    print(describe())
    regression()
    moons()
    cost()


if __name__ == "__main__":
    main()
