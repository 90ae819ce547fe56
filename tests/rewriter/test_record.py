"""The FPE record: one typed record, round-tripped through metadata_props, old records read, bad ones refused."""

from __future__ import annotations

import json

import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.errors import ModelLoadError
from neurorewrite.fpe import FPEConfig
from neurorewrite.rewriter.record import RECORD_KEY, RECORD_VERSION, BlockRecord, FPERecord, LoweredLayer, read_record, write_record
from tests.builders import mlp_model

BLOCK = BlockRecord("fc1", "fc1", "fc2", "Relu", 6, 8, 32, 3, 83, 83, "h", "y")


def test_round_trip_through_metadata() -> None:
    record = FPERecord(FPEConfig(alpha=4, split="shared", seed=3, bias="copy", prune="layer"), (BLOCK,),
                       format="sparse", structured=True, tied=("fc2",), calibrated=("fc2",),
                       lowered=(LoweredLayer("fc1", "csr int8/int16", (32, 6), 40, 120),))
    model = onnx.ModelProto()
    write_record(model, record)
    write_record(model, record.evolve(format="grouped"))  # replaces, does not add a second entry
    assert [p.key for p in model.metadata_props] == [RECORD_KEY]
    back = read_record(model)
    assert back == record.evolve(format="grouped")
    assert json.loads(model.metadata_props[0].value)["version"] == RECORD_VERSION


def test_the_lead_share_round_trips_and_is_absent_when_balanced() -> None:
    record = FPERecord(FPEConfig(alpha=4, split="tiered", lead_share=0.75), (BLOCK,))
    model = onnx.ModelProto()
    write_record(model, record)
    assert json.loads(model.metadata_props[0].value)["lead_share"] == 0.75
    assert read_record(model) == record and read_record(model).config.lead_share == 0.75
    write_record(model, FPERecord(FPEConfig(alpha=4, split="tiered"), (BLOCK,)))
    assert "lead_share" not in json.loads(model.metadata_props[0].value)
    assert read_record(model).config.lead_share is None


def test_a_version_1_record_reads() -> None:
    """What earlier releases wrote: no version field, the options flat, blocks as dicts."""
    old = {"alpha": 2, "split": "random", "seed": 0, "bias": "split", "prune": "global", "format": "dense",
           "blocks": [{**BLOCK.__dict__, "torch_first": None}], "calibrated": ["fc2"]}
    model = onnx.ModelProto()
    model.metadata_props.add(key=RECORD_KEY, value=json.dumps(old))
    record = read_record(model)
    assert record is not None and record.alpha == 2 and record.blocks == (BLOCK,) and record.calibrated == ("fc2",)


@pytest.mark.parametrize("value,problem", [
    ("{not json", "not JSON"),
    (json.dumps({"alpha": 2}), "malformed"),
    (json.dumps({"version": 99, "alpha": 2, "split": "random", "seed": 0, "bias": "split", "prune": "global"}), "newer"),
    (json.dumps({"alpha": 2, "split": "clever", "seed": 0, "bias": "split", "prune": "global"}), "not readable"),
])
def test_a_bad_record_is_a_load_error_naming_the_key(value: str, problem: str) -> None:
    model = onnx.ModelProto()
    model.metadata_props.add(key=RECORD_KEY, value=value)
    with pytest.raises(ModelLoadError, match=f"m.onnx: the {RECORD_KEY} metadata.*{problem}"):
        read_record(model, "m.onnx")


def test_every_pass_extends_the_one_record() -> None:
    model, report = expand(mlp_model(d=8, h=8, o=3), alpha=2, split="blocks", structured=True,
                           calibrate={"x": __import__("numpy").ones((16, 8), "float32")})
    record = read_record(model)
    assert record is not None and record.source == "onnx" and record.version == RECORD_VERSION
    assert record.structured and record.tied and record.calibrated and record.format == "grouped" and record.lowered
    assert [b.nnz_after for b in record.blocks] == [b.nnz_after for b in report.blocks]
