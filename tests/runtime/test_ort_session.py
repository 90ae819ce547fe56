"""``ort_session`` options: threads and spinning reach onnxruntime's session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from neurorewrite.runtime.ort import ort_session
from tests.conftest import sample_for


def test_spinning_off_and_threads_reach_the_session(exports) -> None:
    quiet = ort_session(exports["torchscript_gemm"], providers=["CPUExecutionProvider"], threads=2, spinning=False)
    options = quiet.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = ort_session(exports["torchscript_gemm"], providers=["CPUExecutionProvider"])
    feeds = sample_for(exports["torchscript_gemm"], batch=3)
    np.testing.assert_array_equal(quiet.run(None, feeds)[0], default.run(None, feeds)[0])


def test_tvm_threads_without_spinning_sets_the_pool_variable(monkeypatch) -> None:
    pytest.importorskip("tvm")
    from neurorewrite.runtime.tvm_session import set_threads

    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "unset")  # restored after the test, like TVM_NUM_THREADS
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    set_threads(1)
    assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "unset"
    set_threads(1, spinning=False)
    assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "0"
