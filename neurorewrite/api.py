"""The Python API: everything the CLI does, as functions that take and return models and reports."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import FPEConfig, check_alpha, structured_split
from neurorewrite.passes.expand_blocks import ExpandReport, Progress, expand_model
from neurorewrite.passes.lower import check_format, lower_model
from neurorewrite.passes.tie_outputs import tie_outputs
from neurorewrite.rewriter.blocks import Skipped, find_blocks, select_blocks
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.io import (
    EXTERNAL_DATA_THRESHOLD,
    ModelLike,
    load_model,
    save_model,
    stored_with_external_data,
    weight_bytes,
)
from neurorewrite.rewriter.linear import read_weights
from neurorewrite.rewriter.pipeline import Pass, run_passes
from neurorewrite.rewriter.record import FPERecord, read_record
from neurorewrite.sample import load_sample

if TYPE_CHECKING:  # the calibration imports torch; the API loads it only when a sample is given
    from neurorewrite.passes.calibrate import CalibrateOptions

PRUNE_SCORES = ("magnitude", "activation")


class CalibrationWarning(UserWarning):
    """The calibration ran but its result deserves a look (e.g. fewer sample rows than layer inputs)."""


def load_groups(path: str | os.PathLike) -> tuple[tuple[int, ...], ...]:
    """Read a ``--groups`` JSON file: a list of lists of input indices (or ``{"groups": [...]}``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidOptionError(f"--groups {path}: cannot read a JSON partition ({e})") from e
    if isinstance(data, dict):
        data = data.get("groups")
    if not isinstance(data, list) or not all(isinstance(g, list) and all(isinstance(i, int) for i in g) for g in data):
        raise InvalidOptionError(f"--groups {path}: expected a JSON list of lists of integer input indices")
    return tuple(tuple(g) for g in data)


def expand(
    model: ModelLike,
    alpha: int = 4,
    split: str = "random",
    seed: int = 0,
    bias: str = "split",
    prune: str = "global",
    groups: Sequence[Sequence[int]] | str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    calibrate: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    output: str | os.PathLike | None = None,
    progress: Progress | None = None,
    format: str | None = None,
    structured: bool = False,
    prune_by: str | None = None,
    calibrate_options: CalibrateOptions | None = None,
) -> tuple[onnx.ModelProto, ExpandReport]:
    """FPE-expand every MLP block of ``model`` (a path or a ModelProto); optionally calibrate and save.

    ``calibrate`` is an ``.npz`` path or a mapping from graph input names to sample arrays; the
    calibration's options (refit, target, held-out share, solver) are ``calibrate_options``
    (:class:`neurorewrite.passes.calibrate.CalibrateOptions`). ``prune_by`` is ``magnitude`` or
    ``activation`` (the prune scores use the sample's activation statistics; needs ``calibrate``); by
    default ``activation`` when a sample is given. Warnings of the calibration (too few rows) are in
    ``report.warnings`` and issued as :class:`CalibrationWarning`. With
    ``output`` the model is written atomically (nothing is written if any step fails). ``format``
    (``dense`` by default, ``grouped``, ``sparse``) picks the representation (:mod:`neurorewrite.passes.lower`).
    ``structured`` is the preset that runs at dense speed: the ``shared`` split (or ``feature``), tied
    outgoing weights, ``prune="layer"``, ``grouped`` format (:mod:`neurorewrite.passes.tie_outputs`).
    """
    where = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    alpha = check_alpha(alpha)
    if structured:
        split, prune, format = _structured_options(split, format)
    format = check_format(format or "dense", split)
    if isinstance(groups, (str, os.PathLike)):
        groups = load_groups(groups)
    cfg = FPEConfig(
        alpha=alpha, split=split, seed=int(seed), bias=bias, prune=prune,
        groups=None if groups is None else tuple(tuple(int(i) for i in g) for g in groups),
    )
    sample = None
    if calibrate is not None:
        sample = load_sample(calibrate, "--calibrate")
    prune_by = check_prune_by(prune_by, sample is not None)
    original = load_model(model)
    steps = _pipeline(original, cfg, layers, progress, where, structured, sample, format, prune_by, calibrate_options)
    new, report = run_passes(original, steps)
    assert report is not None  # the pipeline always starts with expand
    for message in report.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    if output is not None:
        external = not isinstance(model, onnx.ModelProto) and stored_with_external_data(model)
        save_model(new, output, external_data=True if external else None)
    else:
        _check_in_memory(new)
    return new, report


def _pipeline(
    original: onnx.ModelProto,
    cfg: FPEConfig,
    layers: Sequence[str] | None,
    progress: Progress | None,
    where: str,
    structured: bool,
    sample: Mapping[str, np.ndarray] | None,
    format: str,
    prune_by: str = "magnitude",
    calibrate_options: CalibrateOptions | None = None,
) -> list[Pass[ExpandReport]]:
    """(activation statistics) -> expand -> (tie, for --structured) -> (calibrate) -> lower."""

    def expand_pass(m: onnx.ModelProto, _: ExpandReport | None) -> tuple[onnx.ModelProto, ExpandReport]:
        scales = None
        if prune_by == "activation" and sample is not None and cfg.alpha > 1:
            from neurorewrite.passes.activation_stats import activation_scales  # torch: only when asked

            chosen, _ = select_blocks(find_blocks(m), list(layers) if layers else None)
            options = calibrate_options or _default_calibrate_options()
            scales = activation_scales(m, chosen, sample, "--calibrate", options.holdout, options.chunk_rows, options.mask_input)
        return expand_model(m, cfg, list(layers) if layers else None, progress, where, scales)

    def lower_pass(m: onnx.ModelProto, report: ExpandReport | None) -> tuple[onnx.ModelProto, ExpandReport]:
        assert report is not None
        report.format = format
        return lower_model(m, format)[0], report

    passes: list[Pass[ExpandReport]] = [Pass("expand", expand_pass)]
    if structured:
        passes.append(Pass("tie outputs", lambda m, r: tie_outputs(original, m, r)))
    options = calibrate_options or _default_calibrate_options() if sample is not None else None
    if sample is not None and options is not None and options.refit != "none":
        from neurorewrite.passes.calibrate import calibrate_model  # imports torch: only when asked

        passes.append(Pass("calibrate", lambda m, r: calibrate_model(original, m, r, sample, structured, options)))
    passes.append(Pass(f"lower to {format}", lower_pass))
    return passes


def _default_calibrate_options() -> CalibrateOptions:
    from neurorewrite.passes.calibrate import CalibrateOptions

    return CalibrateOptions()


def check_prune_by(prune_by: str | None, has_sample: bool) -> str:
    """``prune_by`` checked; by default ``activation`` with a sample, ``magnitude`` without."""
    if prune_by is None:
        return "activation" if has_sample else "magnitude"
    if prune_by not in PRUNE_SCORES:
        raise InvalidOptionError(f"--prune-by must be one of {', '.join(PRUNE_SCORES)}, got {prune_by!r}")
    if prune_by == "activation" and not has_sample:
        raise InvalidOptionError("--prune-by activation measures activations on a sample: give --calibrate SAMPLE.npz")
    return prune_by


def _structured_options(split: str, format: str | None) -> tuple[str, str, str]:
    """``--structured`` fixes split (:func:`neurorewrite.fpe.structured_split`), prune (layer) and format (grouped)."""
    if format not in (None, "grouped"):
        raise InvalidOptionError(f"--structured writes the grouped format; drop --format {format} or use --format grouped")
    return structured_split(split), "layer", "grouped"


def _check_in_memory(model: onnx.ModelProto) -> None:
    if weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model, full_check=True)


@dataclass(frozen=True)
class BlockInfo:
    name: str
    first: str
    second: str
    activation: str
    in_features: int
    width: int
    out_features: int
    nonzeros: int
    parameters: int
    form: str = "mlp"  # "mlp", "gated", "gated (fused gate/up)"
    up: str | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Inspection:
    """What ``inspect`` shows: the MLP blocks, their sizes, and any FPE record in the metadata."""

    blocks: list[BlockInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    fpe: FPERecord | None = None


def inspect(model: ModelLike) -> Inspection:
    """List the MLP blocks of a model with widths and nonzero counts, and its FPE metadata."""
    proto = load_model(model)
    search = find_blocks(proto)
    index = GraphIndex.build(proto.graph)
    out = Inspection(skipped=search.skipped, fpe=read_record(proto, str(model)))
    for block in search.blocks:
        arrays = [a for lin in block.linears for a in read_weights(index, lin) if a is not None]
        out.blocks.append(
            BlockInfo(
                block.name, block.first.name, block.second.name, block.activation, block.in_features,
                block.width, block.out_features, sum(int(np.count_nonzero(a)) for a in arrays),
                sum(a.size for a in arrays), block.form, None if block.up is None else block.up.name, block.notes,
            )
        )
    return out


def default_output(path: str | os.PathLike, tag: str = "fpe") -> Path:
    """``model.onnx`` -> ``model.<tag>.onnx`` beside it (``model.fpe.onnx`` by default)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{tag}{p.suffix or '.onnx'}")
