"""The pass manager names the pass that broke and the passes that ran before it."""

from __future__ import annotations

import onnx
import pytest

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import FPEConfig
from neurorewrite.passes.expand_blocks import expand_model
from neurorewrite.rewriter.pipeline import Pass, PassError, run_passes
from tests.builders import mlp_model


def expand_pass(model, _):
    return expand_model(model, FPEConfig(alpha=2))


def drop_first_node(model, report):
    new = onnx.ModelProto()
    new.CopyFrom(model)
    del new.graph.node[0]  # leaves a dangling input: the checker must catch it
    return new, report


def test_a_pass_that_writes_an_invalid_graph_is_named():
    with pytest.raises(PassError, match=r"pass 'break graph' failed \(after expand\)"):
        run_passes(mlp_model(), [Pass("expand", expand_pass), Pass("break graph", drop_first_node)])


def test_user_errors_pass_through_unchanged():
    def refuse(model, report):
        raise InvalidOptionError("--format x: unknown")

    with pytest.raises(InvalidOptionError, match="unknown"):
        run_passes(mlp_model(), [Pass("expand", expand_pass), Pass("lower", refuse)])


def test_passes_run_in_order_and_the_input_is_kept():
    model = mlp_model()
    before = model.SerializeToString()
    new, report = run_passes(model, [Pass("expand", expand_pass), Pass("expand again", expand_pass)])
    assert model.SerializeToString() == before
    assert report is not None and report.blocks[0].width_before == 16  # the second pass saw the first's output


def test_an_internal_error_without_a_message_is_named_by_its_type():
    def crash(model, report):
        raise KeyError()

    with pytest.raises(PassError, match=r"pass 'crash' failed \(after expand\): KeyError; please report this"):
        run_passes(mlp_model(), [Pass("expand", expand_pass), Pass("crash", crash)])
