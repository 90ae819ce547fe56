"""Every command's bad input through one check (tests/cli_checks.py): exit 2, one stderr line naming the
cause, nothing on stdout, nothing written. Each case runs in this process; one case per command also runs
as a real ``python -m neurorewrite.cli`` process, where stderr is the real file descriptor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from tests.builders import mlp_model
from tests.cli_checks import assert_cli_fails


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Input files, never written by a case (each case writes into its own empty folder)."""
    d = tmp_path_factory.mktemp("cli_inputs")
    onnx.save_model(mlp_model(d=10, h=12, o=4), str(d / "model.onnx"))
    expand(d / "model.onnx", alpha=2, output=d / "model.fpe.onnx")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 10])]))
    onnx.save_model(plain, str(d / "plain.onnx"))
    (d / "text.onnx").write_text("hello, I am not a model")
    (d / "truncated.onnx").write_bytes((d / "model.onnx").read_bytes()[:200])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    np.savez(d / "train.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    np.savez(d / "no_y.npz", x=x)
    np.savez(d / "wide.npz", x=np.ones((64, 7), np.float32), y=np.zeros(64, np.int64))
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 broken")
    (d / "overlap.json").write_text(json.dumps([[0, 1, 2], [2, 3, 4, 5, 6, 7, 8, 9]]))
    (d / "notjson.json").write_text("not json")
    return d


Case = Callable[[Path, Path], tuple[list[object], list[str], list[Path]]]


def case(argv: list[str], needles: list[str], outputs: list[str]) -> Case:
    """``{in}`` and ``{out}`` in argv and outputs stand for the inputs folder and the case's output folder."""
    def build(i: Path, o: Path) -> tuple[list[object], list[str], list[Path]]:
        fill = lambda s: s.replace("{in}", str(i)).replace("{out}", str(o))  # noqa: E731
        return [fill(a) for a in argv], needles, [Path(fill(p)) for p in outputs]
    return build


OUT = "{out}/result.onnx"
CASES: dict[str, Case] = {
    # expand
    "expand-missing-model": case(["expand", "{in}/nope.onnx", "--alpha", "2", "-o", OUT], ["nope.onnx", "no such file"], [OUT]),
    "expand-not-onnx": case(["expand", "{in}/text.onnx", "--alpha", "2", "-o", OUT], ["text.onnx", "not a readable ONNX model"], [OUT]),
    "expand-truncated": case(["expand", "{in}/truncated.onnx", "--alpha", "2", "-o", OUT], ["truncated.onnx"], [OUT]),
    "expand-no-block": case(["expand", "{in}/plain.onnx", "--alpha", "2", "-o", OUT], ["no MLP block"], [OUT]),
    "expand-alpha-zero": case(["expand", "{in}/model.onnx", "--alpha", "0", "-o", OUT], ["--alpha"], [OUT]),
    "expand-alpha-word": case(["expand", "{in}/model.onnx", "--alpha", "four", "-o", OUT], ["--alpha", "four"], [OUT]),
    "expand-alpha-missing": case(["expand", "{in}/model.onnx", "-o", OUT], ["--alpha"], [OUT]),
    "expand-bad-choice": case(["expand", "{in}/model.onnx", "--alpha", "2", "--split", "nope", "-o", OUT], ["--split", "nope"], [OUT]),
    "expand-groups-needed": case(["expand", "{in}/model.onnx", "--alpha", "2", "--split", "groups", "-o", OUT], ["--groups"], [OUT]),
    "expand-groups-overlap": case(["expand", "{in}/model.onnx", "--alpha", "2", "--split", "groups", "--groups",
                                   "{in}/overlap.json", "-o", OUT], ["--groups", "several groups"], [OUT]),
    "expand-groups-not-json": case(["expand", "{in}/model.onnx", "--alpha", "2", "--split", "groups", "--groups",
                                    "{in}/notjson.json", "-o", OUT], ["--groups"], [OUT]),
    "expand-npz-garbage": case(["expand", "{in}/model.onnx", "--alpha", "2", "--calibrate", "{in}/garbage.npz", "-o", OUT],
                               ["--calibrate", "garbage.npz"], [OUT]),
    "expand-npz-shape": case(["expand", "{in}/model.onnx", "--alpha", "2", "--calibrate", "{in}/wide.npz", "-o", OUT],
                             ["expects shape"], [OUT]),
    "expand-output-is-input": case(["expand", "{in}/model.onnx", "--alpha", "2", "-o", "{in}/model.onnx"], ["is the same file as the model", "never writes over its inputs"], []),
    "expand-output-folder-missing": case(["expand", "{in}/model.onnx", "--alpha", "2", "-o", "{out}/no/such/dir/m.onnx"],
                                         ["does not exist"], ["{out}/no"]),
    "expand-structured-sparse": case(["expand", "{in}/model.onnx", "--alpha", "2", "--structured", "--format", "sparse",
                                      "-o", OUT], ["--structured"], [OUT]),
    # inspect
    "inspect-missing": case(["inspect", "{in}/nope.onnx"], ["nope.onnx", "no such file"], []),
    "inspect-not-onnx": case(["inspect", "{in}/text.onnx"], ["text.onnx"], []),
    # finetune
    "finetune-no-y": case(["finetune", "{in}/model.fpe.onnx", "--data", "{in}/no_y.npz", "-o", OUT], ["missing y"], [OUT]),
    "finetune-wide": case(["finetune", "{in}/model.fpe.onnx", "--data", "{in}/wide.npz", "-o", OUT], ["expects"], [OUT]),
    "finetune-garbage": case(["finetune", "{in}/model.fpe.onnx", "--data", "{in}/garbage.npz", "-o", OUT],
                             ["not a readable .npz file"], [OUT]),
    "finetune-epochs": case(["finetune", "{in}/model.fpe.onnx", "--data", "{in}/train.npz", "--epochs", "-1", "-o", OUT],
                            ["--epochs"], [OUT]),
    "finetune-lr": case(["finetune", "{in}/model.fpe.onnx", "--data", "{in}/train.npz", "--lr", "0", "-o", OUT], ["--lr"], [OUT]),
    "finetune-data-missing": case(["finetune", "{in}/model.fpe.onnx", "-o", OUT], ["--data"], [OUT]),
    "finetune-output-is-input": case(["finetune", "{in}/model.fpe.onnx", "--data", "{in}/train.npz", "-o",
                                      "{in}/model.fpe.onnx"], ["is the same file as the model", "never writes over its inputs"], []),
    "finetune-missing-model": case(["finetune", "{in}/nope.onnx", "--data", "{in}/train.npz", "-o", OUT], ["nope.onnx"], [OUT]),
    # analyze
    "analyze-no-block": case(["analyze", "{in}/plain.onnx", "--html", "{out}/r.html"], ["no MLP block"], ["{out}/r.html"]),
    "analyze-data-garbage": case(["analyze", "{in}/model.onnx", "--data", "{in}/garbage.npz", "--html", "{out}/r.html"],
                                 ["not a readable .npz"], ["{out}/r.html"]),
    "analyze-html-folder-missing": case(["analyze", "{in}/model.onnx", "--html", "{out}/no/r.html"], ["does not exist"],
                                        ["{out}/no"]),
    # bench
    "bench-batch": case(["bench", "{in}/model.onnx", "--batch", "0"], ["--batch"], []),
    "bench-batch-words": case(["bench", "{in}/model.onnx", "--batch", "a,b"], ["--batch"], []),
    "bench-repeats": case(["bench", "{in}/model.onnx", "--repeats", "0"], ["--repeats"], []),
    "bench-repeats-word": case(["bench", "{in}/model.onnx", "--repeats", "x"], ["--repeats"], []),
    "bench-missing": case(["bench", "{in}/nope.onnx"], ["nope.onnx", "no such file"], []),
    # compile (imports TVM)
    "compile-trials-without-tune": case(["compile", "{in}/model.fpe.onnx", "--trials", "3", "-o", "{out}/m.so"], ["--trials"],
                                        ["{out}/m.so", "{out}/m.so.json"]),
    "compile-bad-shape": case(["compile", "{in}/model.fpe.onnx", "--shape", "x=a", "-o", "{out}/m.so"], ["--shape"],
                              ["{out}/m.so", "{out}/m.so.json"]),
    "compile-bad-target": case(["compile", "{in}/model.fpe.onnx", "--target", "nonsense", "--shape", "x=2,10", "-o", "{out}/m.so"],
                               ["--target"], ["{out}/m.so", "{out}/m.so.json"]),
    "compile-missing-model": case(["compile", "{in}/nope.onnx", "-o", "{out}/m.so"], ["nope.onnx"], ["{out}/m.so"]),
    # the top level
    "unknown-command": case(["nosuch"], ["nosuch"], []),
}
# one case per command also runs as a real process
IN_SUBPROCESS = ["expand-not-onnx", "expand-bad-choice", "inspect-missing", "finetune-no-y", "analyze-no-block",
                 "bench-repeats", "compile-trials-without-tune"]


def _run(name: str, inputs: Path, tmp_path: Path, in_process: bool) -> None:
    if name.startswith("compile"):
        pytest.importorskip("tvm")  # a declared component: tests/declared.py fails this skip in CI
    out = tmp_path / "out"
    out.mkdir()
    argv, needles, outputs = CASES[name](inputs, out)
    assert_cli_fails(argv, *needles, outputs=outputs, watch=[out, inputs], in_process=in_process)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(inputs, tmp_path, name) -> None:
    _run(name, inputs, tmp_path, in_process=True)


@pytest.mark.parametrize("name", IN_SUBPROCESS)
def test_bad_input_in_a_real_process(inputs, tmp_path, name) -> None:
    _run(name, inputs, tmp_path, in_process=False)


def test_an_existing_output_survives_a_failed_run(inputs, tmp_path) -> None:
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"precious")
    assert_cli_fails(["expand", inputs / "model.onnx", "--alpha", "0", "-o", out], "--alpha", watch=[tmp_path])
    assert_cli_fails(["finetune", inputs / "model.fpe.onnx", "--data", inputs / "no_y.npz", "-o", out], "missing y",
                     watch=[tmp_path])
    assert out.read_bytes() == b"precious"
