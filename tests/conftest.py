"""Shared fixtures: real exports from torch (TorchScript and dynamo) and skl2onnx, made once per session."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.declared import (  # noqa: F401  (hooks: import skips fail in CI, GPU tests run where a GPU is)
    pytest_collection_modifyitems,
    pytest_make_collect_report,
    pytest_runtest_makereport,
    pytest_sessionstart,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def export_torch(module, example, path: Path, dynamo: bool = False, opset: int | None = None) -> Path:
    torch = _torch()
    module.eval()
    kwargs = {"dynamo": dynamo}
    if opset is not None:
        kwargs["opset_version"] = opset
    if not dynamo:
        kwargs.update(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), **kwargs)
    return path


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Path]:
    """name -> path of a real exported model. With NEUROREWRITE_EXPORT_CACHE=FOLDER the exports are made
    once into FOLDER and reused by later sessions (benchmarks/mutation.py runs a session per mutant)."""
    cache = os.environ.get("NEUROREWRITE_EXPORT_CACHE")
    if cache:
        index = Path(cache) / "exports.json"
        if index.is_file():
            return {k: Path(v) for k, v in json.loads(index.read_text()).items()}
        Path(cache).mkdir(parents=True, exist_ok=True)
        made = _make_exports(Path(tempfile.mkdtemp(dir=cache)))  # a folder of its own: sessions may race
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: str(v) for k, v in made.items()}))
        os.replace(tmp, index)
        return made
    return _make_exports(tmp_path_factory.mktemp("exports"))


def _make_exports(out: Path) -> dict[str, Path]:
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    models: dict[str, Path] = {}
    relu = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 5))
    models["torchscript_gemm"] = export_torch(relu, x, out / "ts.onnx")
    models["dynamo_gemm"] = export_torch(relu, x, out / "dyn.onnx", dynamo=True, opset=18)
    deep = nn.Sequential(nn.Linear(16, 20), nn.GELU(), nn.Linear(20, 12), nn.SiLU(), nn.Linear(12, 4))
    models["gelu_silu_chain"] = export_torch(deep, x, out / "deep.onnx")
    models["gelu_erf"] = export_torch(nn.Sequential(nn.Linear(16, 20), nn.GELU(), nn.Linear(20, 4)), x, out / "gelu_erf.onnx", opset=17)
    models["gelu_tanh"] = export_torch(nn.Sequential(nn.Linear(16, 20), nn.GELU(approximate="tanh"), nn.Linear(20, 4)), x, out / "gelu_tanh.onnx", opset=17)
    acts = {"leaky": nn.LeakyReLU(0.1), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "elu": nn.ELU(), "softplus": nn.Softplus()}
    for name, act in acts.items():
        models[name] = export_torch(nn.Sequential(nn.Linear(16, 12), act, nn.Linear(12, 3)), x, out / f"act_{name}.onnx")
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    models["transformer"] = export_torch(enc, torch.randn(2, 5, 16), out / "enc.onnx", dynamo=True)
    models["sklearn_mlp"] = _sklearn_mlp(out / "skl.onnx")
    return models


def _sklearn_mlp(path: Path) -> Path:
    pytest.importorskip("skl2onnx")
    import warnings as w

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    with w.catch_warnings():
        w.simplefilter("ignore")
        clf = MLPClassifier((16,), max_iter=60, random_state=0).fit(X / 16, y)
    onx = to_onnx(clf, (X[:1] / 16).astype(np.float32), options={"zipmap": False})
    path.write_bytes(onx.SerializeToString())
    return path


def sample_for(path: Path, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_model(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
