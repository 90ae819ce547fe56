"""The torch lifter on a real transformer export: same function as onnxruntime, stretch-wise runs, pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurorewrite.errors import UnsupportedModelError
from neurorewrite.models.onnx_module import OnnxGraph
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.runtime.ort import ort_session
from tests.text_models import Embedder, export_embedder, tiny_bert, token_sample

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_onnx():
    return export_embedder(Embedder(tiny_bert()))


def test_lifted_bert_matches_onnxruntime(bert_onnx):
    sample = token_sample(8)
    graph = OnnxGraph(bert_onnx)
    assert [i.name for i in graph.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        ours = graph(*(torch.from_numpy(sample[i.name]) for i in graph.inputs)).numpy()
    ref = ort_session(bert_onnx).run(None, sample)[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_a_run_in_stretches_equals_one_run(bert_onnx):
    graph = OnnxGraph(bert_onnx)
    feeds = {k: torch.from_numpy(v) for k, v in token_sample(4).items()}
    whole = graph.run(feeds)["embedding"]
    block = find_blocks(bert_onnx).blocks[1]
    cursor = graph.start(feeds)
    graph.advance(cursor, graph.step_of(block.first.output))
    assert block.first.data_input in cursor.env and len(cursor.env) < 12  # dead tensors were dropped
    graph.advance(cursor)
    torch.testing.assert_close(cursor.env["embedding"], whole)


def test_release_drops_outputs_already_read_and_keeps_what_later_steps_read(bert_onnx):
    # calibration asks for every block's output and reads each at its block: kept to the end of the
    # run, they would add up to one residual stream per block and chunk
    blocks = find_blocks(bert_onnx).blocks
    outputs = [b.second.output for b in blocks]
    graph = OnnxGraph(bert_onnx, outputs=outputs)
    feeds = {k: torch.from_numpy(v) for k, v in token_sample(4).items()}
    cursor = graph.start(feeds)
    graph.advance(cursor, graph.step_of(blocks[1].first.output))
    assert outputs[0] in cursor.env  # an output lives on until released
    graph.release(cursor)
    assert outputs[0] not in cursor.env
    assert blocks[1].first.data_input in cursor.env  # the next step still reads it
    graph.advance(cursor)
    assert outputs[1] in cursor.env  # and the run goes on to the end
    graph.release(cursor)
    assert not cursor.env


def test_only_the_nodes_the_outputs_need_are_lifted(bert_onnx):
    block = find_blocks(bert_onnx).blocks[0]
    graph = OnnxGraph(bert_onnx, outputs=[block.second.output])
    full = OnnxGraph(bert_onnx)
    last = block.second.node  # its bias Add is fused into it
    assert max(step.node for step in graph.steps) == last and len(graph.steps) < len(full.steps)
    model = bert_onnx
    model.graph.node[-1].op_type = "Hardmax"  # after every block: not needed, so not refused
    OnnxGraph(model, outputs=[block.second.output])
    with pytest.raises(UnsupportedModelError, match="Hardmax"):
        OnnxGraph(model)


def test_without_autograd_only_fed_rows_are_multiplied_and_in_place_changes_are_seen():
    """Under the global prune with the lead share most non-lead children of the expanded W1' have no input:
    without autograd those rows are not multiplied (their output is their bias). The outputs are the dense
    ones, and a weight changed in place (a calibration's refit) is read again, not the rows found before."""
    from neurorewrite.api import expand
    from neurorewrite.models.onnx_module import fed_rows

    # a fresh export: an earlier test edits the module's shared one
    expanded, _ = expand(export_embedder(Embedder(tiny_bert())), alpha=4, split="tiered", lead_share=0.75,
                         prune_by="magnitude")
    graph = OnnxGraph(expanded)
    sparse = [layer for layer in graph.layers.values() if fed_rows(layer.weight.detach()) is not None]
    assert len(sparse) == 2  # each block's W1'
    feeds = {k: torch.from_numpy(v) for k, v in token_sample(6).items()}

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fast = graph.run(feeds)["embedding"]
        return fast, graph.run(feeds)["embedding"].detach()  # autograd: the plain product of every row

    fast, dense = both()
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.numpy(), ort_session(expanded).run(None, {k: v.numpy() for k, v in feeds.items()})[0],
                               rtol=1e-4, atol=1e-5)
    weight = sparse[0].weight
    empty = torch.nonzero(~weight.detach().ne(0).any(dim=1)).squeeze(1)
    with torch.no_grad():
        weight[empty] = 0.05  # every row fed now: the dense product again
    changed, dense_changed = both()
    torch.testing.assert_close(changed, dense_changed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed, fast)


@pytest.mark.parametrize("bias", [True, False])
def test_the_fed_rows_product_is_the_dense_one_with_and_without_a_bias(bias):
    from neurorewrite.models.onnx_module import fed_rows, linear_on_rows

    weight = torch.zeros(12, 5)
    weight[[2, 7, 11]] = torch.randn(3, 5)
    b = torch.randn(12) if bias else None
    x = torch.randn(2, 4, 5)
    fed = fed_rows(weight)
    assert fed is not None and fed.tolist() == [2, 7, 11]
    torch.testing.assert_close(linear_on_rows(x, weight, b, fed), torch.nn.functional.linear(x, weight, b))
    assert fed_rows(torch.randn(12, 5)) is None  # every row fed: the plain product
