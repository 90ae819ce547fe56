"""A small dense MLP on scikit-learn's digits: the data, training, export, and accuracy in onnxruntime.

Shared by the README demo, the calibration benchmark and the tests, so all three measure the same thing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], split 70/30 (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def train_mlp(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int = 300):
    """A 64 -> hidden -> 10 ReLU MLP trained full-batch with Adam."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    return fit_full_batch(model, x, y, epochs)


def fit_full_batch(model, x: np.ndarray, y: np.ndarray, epochs: int):  # noqa: ANN001, ANN201 - torch modules
    """Train ``model`` on all of ``(x, y)`` at once for ``epochs`` Adam steps (lr 1e-2, cross entropy);
    returns it in eval mode. Seed torch before building the model."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def export(model, path: Path, features: int = 64) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, features),), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model (path or ModelProto) in onnxruntime."""
    from neurorewrite.runtime.ort import ort_session

    session = ort_session(model, providers=["CPUExecutionProvider"], threads=1)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def recovered(dense: float, bare: float, calibrated: float) -> float:
    """Share of the accuracy the bare expansion lost that calibration won back (1.0 when nothing was lost)."""
    lost = dense - bare
    return 1.0 if lost <= 0 else (calibrated - bare) / lost
