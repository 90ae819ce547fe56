"""``neurorewrite bench`` end to end on real files: a table of ratios, and clear errors for bad input."""

from __future__ import annotations

import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.cli import main
from neurorewrite.errors import DataError
from neurorewrite.runtime.bench import bench_files
from tests.builders import mlp_model


def test_bench_table(exports, tmp_path, capsys) -> None:
    sparse = tmp_path / "m.sparse.onnx"
    structured = tmp_path / "m.structured.onnx"
    expand(exports["torchscript_gemm"], alpha=2, format="sparse", output=sparse)
    expand(exports["torchscript_gemm"], alpha=2, structured=True, output=structured)
    code = main(["bench", str(exports["torchscript_gemm"]), str(sparse), str(structured), "--batch", "1,4", "--repeats", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "batch 4 ratio" in out and str(sparse) in out and str(structured) in out
    assert out.count("1.00x") >= 2  # the reference row: its own ratio in bytes and in each batch


def test_bench_result_ratios(exports, tmp_path) -> None:
    dense = tmp_path / "m.dense.onnx"
    expand(exports["torchscript_gemm"], alpha=2, output=dense)
    result = bench_files([exports["torchscript_gemm"], dense], [1, 3], repeats=2)
    assert result.ratio(str(exports["torchscript_gemm"]), 1) == 1.0
    assert all(v > 0 for v in result.median.values()) and set(result.nbytes) == set(result.labels)


class _Recorded:
    """A real onnxruntime session that also records, in a shared list, each time it runs."""

    def __init__(self, session, label: str, calls: list[str]) -> None:
        self._session, self._label, self._calls = session, label, calls

    def get_inputs(self):  # noqa: ANN201
        return self._session.get_inputs()

    def run(self, names, feeds):  # noqa: ANN001, ANN201
        self._calls.append(self._label)
        return self._session.run(names, feeds)


def test_bursts_run_each_model_several_times_in_a_row(exports) -> None:
    from neurorewrite.runtime.bench import bench_sessions
    from neurorewrite.runtime.ort import ort_session

    calls: list[str] = []
    sessions = {label: _Recorded(ort_session(exports["torchscript_gemm"], providers=["CPUExecutionProvider"]), label, calls)
                for label in ("a", "b")}
    bench_sessions(sessions, [1], repeats=2, warmup=1, burst=3)
    assert calls == ["a", "a", "a", "b", "b", "b"] * 3
    calls.clear()
    bench_sessions(sessions, [1], repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3


def test_mismatched_inputs_are_a_data_error(exports, tmp_path) -> None:
    other = tmp_path / "wide.onnx"
    onnx.save(mlp_model(d=7, h=5, o=2), str(other))  # 7 input features, the reference has 16
    with pytest.raises(DataError, match="expects shape"):
        bench_files([exports["torchscript_gemm"], other], [1], repeats=1)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be"),
    (["--batch", "a,b"], "--batch must be"),
    (["--repeats", "0"], "--repeats must be"),
])
def test_bad_options_exit_2(exports, capsys, argv, message) -> None:
    assert main(["bench", str(exports["torchscript_gemm"]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_exit_2(tmp_path, capsys) -> None:
    assert main(["bench", str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
