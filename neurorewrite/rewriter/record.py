"""The FPE record: what was expanded, how, and what later passes did to it, kept in ``metadata_props``.

One typed, versioned record, written and read only here. ``expand`` creates it, the tie step, the
calibration and the lowering extend it (each with :meth:`FPERecord.evolve`), ``export_onnx`` writes one
for a torch model, and every reader (lowering, folding, the TVM importer, ``inspect``, ``analyze``) gets
the typed object back from :func:`read_record`.

On disk it is JSON under the key :data:`RECORD_KEY`. Version 1 (no ``version`` field) is what earlier
releases wrote; it reads unchanged. A record this code cannot read is a :class:`ModelLoadError` that
names the key, never a silent ``None``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import onnx

from neurorewrite.errors import ModelLoadError
from neurorewrite.fpe import FPEConfig

RECORD_KEY = "neurorewrite.fpe"
RECORD_VERSION = 2


@dataclass(frozen=True)
class BlockRecord:
    """One expanded block: its layers, widths and nonzero counts, and the tensors later passes find it by.

    ``first``/``second`` are ONNX node names in a model's record; in the record of a torch module
    (``fpe_expand``) they are module paths, which ``export_onnx`` moves to ``torch_first``/``torch_second``.
    """

    name: str
    first: str
    second: str
    activation: str
    in_features: int
    width_before: int
    width_after: int
    out_features: int
    nnz_before: int
    nnz_after: int
    hidden_tensor: str = ""
    output_tensor: str = ""
    torch_first: str | None = None
    torch_second: str | None = None
    up: str | None = None  # a gated block's up projection (None: ungated, or gate and up fused in ``first``)
    form: str = "mlp"  # "mlp", "gated", "gated (fused gate/up)"
    notes: tuple[str, ...] = ()  # what the count and the rewrite did with shared tensors or a bias held elsewhere


@dataclass(frozen=True)
class LoweredLayer:
    """How the lowering pass stored one linear layer (``kind``: the format's name for it)."""

    layer: str
    kind: str
    shape: tuple[int, ...]
    nonzeros: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class FPERecord:
    """The options of an expansion, its blocks, and what the passes after it did."""

    config: FPEConfig
    blocks: tuple[BlockRecord, ...] = ()
    format: str = "dense"
    structured: bool = False
    tied: tuple[str, ...] = ()  # last linears whose children share their parent's column (``--structured``)
    calibrated: tuple[str, ...] = ()  # linears refit by ``calibrate``
    lowered: tuple[LoweredLayer, ...] = ()
    source: str = "onnx"  # "torch" for a record written by ``export_onnx``
    version: int = RECORD_VERSION

    @property
    def alpha(self) -> int:
        return self.config.alpha

    @property
    def output_tensors(self) -> set[str]:
        """The output tensors of the expanded blocks' second linears: how passes find the blocks again."""
        return {b.output_tensor for b in self.blocks}

    def evolve(self, **changes: Any) -> FPERecord:
        """A copy with ``changes`` applied (the record is immutable)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The on-disk form: the options flat at the top level, as version 1 had them."""
        cfg = self.config
        out: dict[str, Any] = {
            "version": self.version, "alpha": cfg.alpha, "split": cfg.split, "seed": cfg.seed, "bias": cfg.bias,
            "prune": cfg.prune, "format": self.format, "source": self.source,
            "blocks": [_without_none(asdict(b)) for b in self.blocks],
        }
        if cfg.lead_share is not None:
            out["lead_share"] = cfg.lead_share
        if self.structured:
            out["structured"] = True
        for key in ("tied", "calibrated"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.lowered:
            out["lowered"] = [_without_none({**asdict(layer), "shape": list(layer.shape)}) for layer in self.lowered]
        return out

    @classmethod
    def from_json(cls, data: object, where: str = "model") -> FPERecord:
        """Parse :meth:`to_json`'s form (or version 1's); raises ModelLoadError naming what is wrong."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            version = int(data.get("version", 1))
            if version > RECORD_VERSION:
                raise ValueError(f"version {version} is newer than this neurorewrite reads ({RECORD_VERSION}); upgrade")
            config = FPEConfig(
                alpha=int(data["alpha"]), split=str(data["split"]), seed=int(data["seed"]), bias=str(data["bias"]),
                prune=str(data["prune"]), groups=() if data["split"] == "groups" else None,
                lead_share=None if data.get("lead_share") is None else float(data["lead_share"]),
            )
            block_keys = {f.name for f in fields(BlockRecord)}
            layer_keys = {f.name for f in fields(LoweredLayer)}
            return cls(
                config=config,
                blocks=tuple(_block_record(b, block_keys) for b in data.get("blocks", [])),
                format=str(data.get("format", "dense")),
                structured=bool(data.get("structured", False)),
                tied=tuple(str(t) for t in data.get("tied", [])),
                calibrated=tuple(str(t) for t in data.get("calibrated", [])),
                lowered=tuple(
                    LoweredLayer(**{**{k: v for k, v in row.items() if k in layer_keys}, "shape": tuple(row.get("shape", ()))})
                    for row in data.get("lowered", [])
                ),
                source=str(data.get("source", "onnx")),
                version=RECORD_VERSION,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{where}: the {RECORD_KEY} metadata record is malformed ({e}); re-run expand") from e
        except ModelLoadError:
            raise
        except Exception as e:  # FPEConfig's InvalidOptionError: a record naming an option this version lacks
            raise ModelLoadError(f"{where}: the {RECORD_KEY} metadata record is not readable ({e})") from e


def _block_record(row: dict[str, Any], keys: set[str]) -> BlockRecord:
    kept = {k: v for k, v in row.items() if k in keys}
    if "notes" in kept:
        kept["notes"] = tuple(str(n) for n in kept["notes"])
    return BlockRecord(**kept)


def _without_none(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None}


def read_record(model: onnx.ModelProto, where: str = "model") -> FPERecord | None:
    """The model's FPE record, or None when it has none."""
    for prop in model.metadata_props:
        if prop.key == RECORD_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{where}: the {RECORD_KEY} metadata is not JSON ({e})") from e
            return FPERecord.from_json(data, where)
    return None


def write_record(model: onnx.ModelProto, record: FPERecord) -> None:
    """Store ``record`` in ``model.metadata_props``, replacing an earlier one in place.

    Edits ``model`` itself: call it on the new model a pass built, never on the pass's input.
    """
    write_json_metadata(model, RECORD_KEY, record.to_json())


def write_json_metadata(model: onnx.ModelProto, key: str, value: object) -> None:
    """Store ``value`` as JSON under ``key`` in ``metadata_props`` (replacing an earlier value)."""
    text = json.dumps(value, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = text
            return
    model.metadata_props.add(key=key, value=text)


def read_json_metadata(model: onnx.ModelProto, key: str) -> Any:
    """The JSON value under ``key`` in ``metadata_props``, or None."""
    for prop in model.metadata_props:
        if prop.key == key:
            return json.loads(prop.value)
    return None
