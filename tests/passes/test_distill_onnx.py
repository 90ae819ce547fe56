"""Label-free distillation of an ONNX model: masks and graph kept, held-out distance down, bad input refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.cli import main
from neurorewrite.errors import DataError
from neurorewrite.passes.distill_onnx import DistillOptions, distill_model
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights
from neurorewrite.rewriter.record import read_record
from tests.text_models import Embedder, export_embedder, tiny_bert, token_sample

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    teacher = export_embedder(Embedder(tiny_bert()))
    return teacher, expand(teacher, alpha=4, seed=0)[0]


def weights_by_name(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    index = GraphIndex.build(model.graph)
    return {lin.name: read_weights(index, lin)[0] for lin in find_linears(index).values()}


def test_distillation_keeps_masks_and_graph_and_closes_the_gap(models):
    teacher, student = models
    before_bytes = student.SerializeToString()
    new, report = distill_model(student, teacher, token_sample(80, seed=1), DistillOptions(epochs=4, lr=3e-3))
    assert student.SerializeToString() == before_bytes, "the pass changed its input model"
    assert report.held_out_after < report.held_out_before and report.cosine_after > report.cosine_before
    assert report.holdout_samples == 16 and len(report.matched) == 3  # the output and two blocks' residual sums
    expanded = {n for b in read_record(student).blocks for n in (b.first, b.second)}
    old, trained = weights_by_name(student), weights_by_name(new)
    for name, w in old.items():
        if name in expanded:
            np.testing.assert_array_equal(trained[name] != 0, w != 0)
            assert not np.array_equal(trained[name], w)
        else:  # attention and other layers are not trained
            np.testing.assert_array_equal(trained[name], w)
    assert {layer.name for layer in report.layers} == expanded
    assert all(layer.nnz_before == layer.nnz_after for layer in report.layers)
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in student.graph.node]
    assert read_record(new) == read_record(student)
    onnx.checker.check_model(new, full_check=True)


def test_early_stop_keeps_the_best_weights(models):
    teacher, student = models
    _, report = distill_model(student, teacher, token_sample(40, seed=2), DistillOptions(epochs=6, lr=1.0, patience=1))
    assert report.stopped_early and report.held_out_after == min([report.held_out_before, *report.history])


def test_a_teacher_that_is_not_the_original_is_refused(models):
    teacher, student = models
    with pytest.raises(DataError, match="not the student's original"):
        distill_model(student, student, token_sample(10))
    other = onnx.ModelProto()
    other.CopyFrom(teacher)
    other.graph.input[2].name = "segment_ids"
    for node in other.graph.node:
        node.input[:] = ["segment_ids" if i == "token_type_ids" else i for i in node.input]
    with pytest.raises(DataError, match="inputs .* differ from the student's"):
        distill_model(student, other, token_sample(10))


def test_bad_samples_are_refused(models):
    teacher, student = models
    sample = token_sample(10)
    with pytest.raises(DataError, match="no array for model input"):
        distill_model(student, teacher, {"input_ids": sample["input_ids"]})
    floats = {**sample, "input_ids": sample["input_ids"].astype(np.float32)}
    floats["input_ids"][3, 1] = np.nan
    with pytest.raises(DataError, match=r"row\(s\) 3"):
        distill_model(student, teacher, floats)


def test_finetune_command_distils_and_writes_nothing_on_error(models, tmp_path, capsys):
    teacher, student = models
    paths = {name: tmp_path / f"{name}.onnx" for name in ("teacher", "student")}
    onnx.save(teacher, paths["teacher"])
    onnx.save(student, paths["student"])
    np.savez(tmp_path / "sample.npz", **token_sample(40, seed=3))
    out = tmp_path / "tuned.onnx"
    code = main(["finetune", str(paths["student"]), "--teacher", str(paths["teacher"]), "--data",
                 str(tmp_path / "sample.npz"), "--epochs", "2", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file() and "distance to the teacher" in text and "held out" in text
    np.savez(tmp_path / "partial.npz", input_ids=token_sample(5)["input_ids"])
    bad = tmp_path / "bad.onnx"
    code = main(["finetune", str(paths["student"]), "--teacher", str(paths["teacher"]), "--data",
                 str(tmp_path / "partial.npz"), "-o", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no array for model input" in err[0] and not bad.exists()
    code = main(["finetune", str(paths["student"]), "--teacher", str(paths["teacher"]), "--data",
                 str(tmp_path / "sample.npz"), "-o", str(paths["teacher"])])
    assert code == 2 and "--teacher" in capsys.readouterr().err
