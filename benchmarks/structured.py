"""Accuracy of the --structured FPE variant against the paper's unstructured FPE, on sklearn digits.

Structured = one input partition for all neurons (``blocks``, the preset's default: contiguous slices;
or ``shared``: a random partition) + children with tied outgoing weights (runs near dense speed in plain
onnxruntime, see ``benchmarks/deploy.py``); unstructured = random split + global prune (the paper's
rule). Both at the original block's exact nonzero count, alpha 4, on a small MLP (64 -> H -> 10, ReLU)
trained by sklearn and exported with skl2onnx. "bare" is the pass alone; "calibrated" adds the
label-free least-squares refit of the outgoing weights on the training inputs. Mean (min..max) test
accuracy over seeds.

The second table is the paper's use of FPE: a torch MLP (64 -> H -> 10, ReLU, Adam lr 1e-2, batch 32)
trains 25 epochs, is expanded with ``fpe_expand`` (unstructured, or ``structured=True``) and fine-tuned
with fixed masks for 25 more; the dense baseline trains 50. The Boolean DNF comparison is
``benchmarks/structured_boolean.py``.

Run: ``.venv/bin/python -m benchmarks.structured`` from the repository root.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import torch
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from benchmarks.boolean import Shuffled
from benchmarks.boolean import accuracy as torch_accuracy
from benchmarks.boolean import train as train_torch
from benchmarks.machine import describe
from examples.digits import load_data
from neurorewrite.api import expand
from neurorewrite.models import fpe_expand
from neurorewrite.runtime.ort import ort_session
from neurorewrite.table import format_table

ALPHA = 4
SEEDS = range(5)
VARIANTS = {  # label -> expand options
    "unstructured FPE (random, global)": {"split": "random"},
    "structured (blocks, tied)": {"structured": True},
    "structured (shared, tied)": {"structured": True, "split": "shared"},
}


def train(hidden: int, seed: int) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((hidden,), max_iter=300, random_state=seed).fit(x_tr, y_tr)
    return to_onnx(clf, x_tr[:1], options={"zipmap": False}), x_tr, x_te, y_te


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = ort_session(model, providers=["CPUExecutionProvider"], threads=1)
    label = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.mean(label == y))


def summary(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ({100 * min(values):.1f}..{100 * max(values):.1f})"


FINETUNED = {  # label -> fpe_expand options
    "unstructured FPE (random, global)": {"split": "random"},
    "shared split, untied": {"split": "shared", "prune": "layer"},
    "structured (blocks, tied)": {"structured": True},
    "structured (shared, tied)": {"structured": True, "split": "shared"},
    "structured (feature, tied)": {"structured": True, "split": "feature"},
}
EPOCHS = 25  # before and after the expansion; dense gets both


def finetuned(hidden: int, seed: int) -> dict[str, float]:
    """Test accuracy of dense (2 * EPOCHS) and of each FPE variant (EPOCHS, expand, EPOCHS masked)."""
    x_tr, x_te, y_tr, y_te = (torch.from_numpy(a) for a in load_data(seed))
    torch.manual_seed(seed)
    dense = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    data = Shuffled(x_tr, y_tr, 32, seed)
    train_torch(dense, data, EPOCHS, 1e-2)
    warm = copy.deepcopy(dense)
    train_torch(dense, data, EPOCHS, 1e-2)
    out = {f"dense, {2 * EPOCHS} epochs": torch_accuracy(dense, x_te, y_te)}
    for label, options in FINETUNED.items():
        model = fpe_expand(warm, alpha=ALPHA, seed=seed, **options)
        train_torch(model, data, EPOCHS, 1e-2)
        out[f"{label}, {EPOCHS} + {EPOCHS} ft"] = torch_accuracy(model, x_te, y_te)
    return out


def finetuned_table() -> str:
    torch.set_num_threads(1)
    rows = []
    for hidden in (8, 16):
        scores: dict[str, list[float]] = {}
        for seed in SEEDS:
            for label, value in finetuned(hidden, seed).items():
                scores.setdefault(label, []).append(value)
        rows += [(str(hidden), label, summary(values), f"{100 * np.std(values):.1f}") for label, values in scores.items()]
    return format_table(("H", "variant", "accuracy % mean (min..max)", "std"), rows,
                        title=f"\nwith masked fine-tuning (alpha {ALPHA}), same nonzero count as the dense net")


def main() -> None:
    print(describe())
    print(f"digits, alpha {ALPHA}, seeds {list(SEEDS)}, test accuracy % mean (min..max)")
    rows = []
    for hidden in (8, 16):
        scores: dict[str, list[float]] = {"dense (original)": []}
        for seed in SEEDS:
            model, x_tr, x_te, y_te = train(hidden, seed)
            scores["dense (original)"].append(accuracy(model, x_te, y_te))
            for label, options in VARIANTS.items():
                for mode, sample in (("bare", None), ("calibrated", {"X": x_tr})):
                    new, _ = expand(model, alpha=ALPHA, seed=seed, calibrate=sample, **options)
                    scores.setdefault(f"{label}, {mode}", []).append(accuracy(new, x_te, y_te))
        rows += [(str(hidden), label, summary(values)) for label, values in scores.items()]
    print(format_table(("H", "variant", "accuracy %"), rows, title="\nsame nonzero count as the original block"))
    print(finetuned_table())


if __name__ == "__main__":
    main()
