"""Hidden activation statistics through onnxruntime, checked against the same layers run in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export, mlp

from neurorewrite.analysis import activations, analyze
from neurorewrite.analysis.activations import check_data, hidden_statistics, monosemantic_scale
from neurorewrite.errors import DataError
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.io import load_model


def _torch_hidden(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module[1](module[0](torch.from_numpy(x))).numpy().astype(np.float64)


def test_statistics_match_the_torch_hidden_layer(models, sample):
    _, x = sample
    stats = analyze(models["mlp"].path, data={"x": x}).model.blocks[0].activations
    z = _torch_hidden(models["mlp"].module, x)
    mean, var = z.mean(axis=0), z.var(axis=0, ddof=1)
    assert stats.vectors == 64
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.phi_max, monosemantic_scale(z, mean, var).max(axis=0), rtol=1e-3)
    assert stats.dead.tolist() == np.all(z <= 1e-6, axis=0).tolist()


def test_dead_and_always_on_neurons_are_found(tmp_path):
    module = mlp(seed=3)
    with torch.no_grad():
        module[0].bias[0] = -1000.0  # never fires
        module[0].weight[1] = 0.0
        module[0].bias[1] = 2.0  # always fires, constant
        module[0].weight[2] *= 0.001
        module[0].bias[2] = 5.0  # always fires, varies
    path = export(module, tmp_path / "m.onnx").path
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    stats = analyze(path, data={"x": x}).model.blocks[0].activations
    assert stats.dead[0] and not stats.always_on[0]
    assert stats.always_on[1] and stats.always_on[2] and not stats.dead[1]
    assert stats.phi_max[1] == 0.0  # a constant neuron has no monosemantic scale
    z = _torch_hidden(module, x)
    assert int(stats.dead.sum()) == int(np.all(z <= 1e-6, axis=0).sum())
    assert int(stats.always_on.sum()) == int(np.all(z > 1e-6, axis=0).sum())


def test_chunked_runs_give_the_statistics_of_one_run(models, sample, monkeypatch):
    _, x = sample
    proto = load_model(models["chain"].path)
    feeds = check_data(proto, {"x": x}, "test")
    hidden = [b.hidden for b in find_blocks(proto).blocks]
    assert len(hidden) == 2
    one = hidden_statistics(proto, feeds, hidden, rows_per_run=1000)
    steps = []
    many = hidden_statistics(proto, feeds, hidden, rows_per_run=9, progress=lambda d, t: steps.append(d))
    assert steps[-1] == 64 and len(steps) == 8  # ceil(64 / 9) runs
    # adaptive chunks: a first run of 5 rows measures 88 bytes a row (12 + 10 floats), then 11 rows a run
    monkeypatch.setattr(activations, "FIRST_ROWS", 5)
    monkeypatch.setattr(activations, "RUN_BYTES", 1000)
    sized = []
    adaptive = hidden_statistics(proto, feeds, hidden, progress=lambda d, t: sized.append(d))
    assert sized[:3] == [5, 16, 27] and sized[-1] == 64
    for name in hidden:
        np.testing.assert_allclose(adaptive[name].phi_max, one[name].phi_max, rtol=1e-9)
        np.testing.assert_allclose(many[name].mean, one[name].mean, atol=1e-9)
        np.testing.assert_allclose(many[name].var, one[name].var, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(many[name].phi_max, one[name].phi_max, rtol=1e-9)


def test_every_position_of_a_sequence_is_one_vector(tmp_path):
    module = mlp(d=8, h=6, o=2)
    module.eval()
    with torch.no_grad():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.randn(2, 5, 8),), str(tmp_path / "seq.onnx"), dynamo=False,
                              input_names=["x"], dynamic_axes={"x": {0: "n"}})
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    analysis = analyze(tmp_path / "seq.onnx", data={"x": x})
    assert analysis.model.data_vectors == 15
    assert analysis.model.blocks[0].activations.mean.shape == (6,)


def test_a_fixed_batch_dimension_is_run_whole_or_rejected(tmp_path):
    path = export(mlp(), tmp_path / "fixed.onnx", batch_axis=False, example_rows=4).path
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert analyze(path, data={"x": x}).model.data_vectors == 4
    with pytest.raises(DataError, match="expects shape"):
        analyze(path, data={"x": np.concatenate([x, x])})


def test_data_that_does_not_fit_the_inputs_is_a_data_error(models):
    with pytest.raises(DataError, match="input x expects shape"):
        analyze(models["mlp"].path, data={"x": np.zeros((5, 7), np.float32)})
    with pytest.raises(DataError, match="no array for model input"):
        analyze(models["mlp"].path, data={"a": np.zeros((5, 8), np.float32), "b": np.zeros((5, 8), np.float32)})
