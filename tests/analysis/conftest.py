"""Real torch exports for the analysis tests, made once per session."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
nn = torch.nn


@dataclass
class Exported:
    path: Path
    module: "nn.Module"


def export(module: "nn.Module", path: Path, d: int = 8, dynamo: bool = False, batch_axis: bool = True,
           example_rows: int = 4) -> Exported:
    module.eval()
    example = torch.randn(example_rows, d)
    kwargs: dict = {"dynamo": dynamo}
    if not dynamo:
        kwargs.update(input_names=["x"], output_names=["y"])
        if batch_axis:
            kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), **kwargs)
    return Exported(path, module)


def mlp(d: int = 8, h: int = 16, o: int = 3, seed: int = 0) -> "nn.Module":
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, o))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Exported]:
    """name -> a real export: an MLP, its FPE expansion (alpha 4), a two-block chain, a lone linear."""
    import neurorewrite

    out = tmp_path_factory.mktemp("analysis_models")
    found = {"mlp": export(mlp(), out / "mlp.onnx")}
    fpe = out / "mlp.fpe.onnx"
    neurorewrite.expand(found["mlp"].path, alpha=4, output=fpe)
    found["mlp_fpe"] = Exported(fpe, found["mlp"].module)
    torch.manual_seed(1)
    chain = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    found["chain"] = export(chain, out / "chain.onnx")
    found["linear"] = export(nn.Linear(8, 3), out / "linear.onnx")
    return found


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An .npz of 64 rows for the MLP's input ``x`` (8 features)."""
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("analysis_data") / "sample.npz"
    np.savez(path, x=x)
    return path, x
