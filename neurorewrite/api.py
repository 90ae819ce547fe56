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

from neurorewrite.errors import InvalidOptionError, VerificationError, first_line
from neurorewrite.external_data import materialize
from neurorewrite.fpe import DEFAULT_LEAD_SHARE, FPEConfig, block_nnz, check_alpha, structured_split
from neurorewrite.fpe.gram import keeps_rows
from neurorewrite.fpe.refit import CHUNK_ELEMENTS
from neurorewrite.memory import check_fits
from neurorewrite.passes.expand_blocks import ExpandReport, Progress, expand_model
from neurorewrite.passes.lower import LowerReport, check_format, lower_model
from neurorewrite.passes.tie_outputs import tie_outputs
from neurorewrite.paths import Labeled, check_no_overwrite, check_output_folder, tagged_output
from neurorewrite.rewriter.blocks import Skipped, find_blocks, select_blocks
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.io import (
    EXTERNAL_DATA_THRESHOLD,
    ModelLike,
    check_in_memory,
    load_model,
    model_files,
    nonfinite_message,
    nonfinite_weights,
    replaced_files,
    warn_nonfinite,
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
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidOptionError(f"--groups {path}: cannot read a JSON partition ({first_line(e)})") from e
    if isinstance(data, dict):
        data = data.get("groups")
    if not isinstance(data, list) or not all(isinstance(g, list) and all(isinstance(i, int) for i in g) for g in data):
        raise InvalidOptionError(f"--groups {path}: expected a JSON list of lists of integer input indices")
    return tuple(tuple(g) for g in data)


def expand(
    model: ModelLike,
    alpha: int = 4,
    split: str | None = None,
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
    lead_share: float | None = None,
) -> tuple[onnx.ModelProto, ExpandReport]:
    """FPE-expand every MLP block of ``model`` (a path or a ModelProto); optionally calibrate and save.

    ``calibrate`` is an ``.npz`` path or a mapping from graph input names to sample arrays; the
    calibration's options (refit, target, held-out share, solver) are ``calibrate_options``
    (:class:`neurorewrite.passes.calibrate.CalibrateOptions`). ``split`` is by default ``tiered`` when a
    sample is given (each parent's inputs dealt to its children by the size of their term on the sample)
    and ``random`` (the paper's) without one or with ``structured``; ``lead_share`` is the share of each
    neuron's inputs the ``tiered`` split deals to its first child (default :data:`DEFAULT_LEAD_SHARE` with a
    sample, balanced tiers without: ``docs/methods.md`` 1.3c). ``prune_by`` is ``magnitude`` or
    ``activation`` (the prune scores use the sample's activation statistics; needs ``calibrate``); by
    default ``activation`` when a sample is given and the split is not ``tiered``, ``magnitude`` otherwise
    (both defaults measured: ``docs/methods.md`` 1.3c). Warnings of the calibration (too few rows) are in
    ``report.warnings`` and issued as :class:`CalibrationWarning`. With
    ``output`` the model is written atomically (nothing is written if any step fails), after checking
    that ``output`` is none of the inputs (``docs/robustness.md``); the returned model may then keep
    its big tensors in this process's spill files (:mod:`neurorewrite.external_data`: pass it to
    ``save_model`` or ``ort_session``, not to ``onnx.save``). Without ``output`` it is self-contained. ``format``
    (``dense`` by default, ``grouped``, ``sparse``) picks the representation (:mod:`neurorewrite.passes.lower`).
    ``structured`` is the preset that runs at dense speed: the ``shared`` split (or ``feature``), tied
    outgoing weights, ``prune="layer"``, ``grouped`` format (:mod:`neurorewrite.passes.tie_outputs`).
    """
    where = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    alpha = check_alpha(alpha)
    seed = check_seed(seed)
    if output is not None:
        files = [(opt, p) for opt, p in (("--calibrate", calibrate), ("--groups", groups)) if isinstance(p, (str, os.PathLike))]
        _check_output(model, output, files)
    split = default_split(split, calibrate is not None, structured)
    if structured:
        split, prune, format = _structured_options(split, format)
    format = check_format(format or "dense", split)
    if isinstance(groups, (str, os.PathLike)):
        groups = load_groups(groups)
    cfg = FPEConfig(
        alpha=alpha, split=split, seed=seed, bias=bias, prune=prune,
        groups=None if groups is None else tuple(tuple(int(i) for i in g) for g in groups),
        lead_share=default_lead_share(lead_share, split, calibrate is not None),
    )
    sample = None
    if calibrate is not None:
        sample = load_sample(calibrate, "--calibrate")
    prune_by = check_prune_by(prune_by, sample is not None, split)
    original = load_model(model, warn=False, spill=True)  # big weights stay in files until read
    done = read_record(original, where)
    if done is not None:
        raise InvalidOptionError(
            f"{where} was already expanded by neurorewrite (alpha {done.config.alpha}, format {done.format}): expanding"
            " it again would split its children again; expand the original model, or store this one in another"
            " format with neurorewrite convert")
    bad_weights = warn_nonfinite(original, where)
    if sample is not None and bad_weights:
        raise InvalidOptionError("--calibrate: " + nonfinite_message(where, bad_weights).replace(
            "outputs that depend on it are not finite", "a refit on them would be NaN; repair the model first"))
    _check_memory(original, layers, alpha, sample, structured, calibrate_options)
    steps = _pipeline(original, cfg, layers, progress, where, structured, sample, format, prune_by, calibrate_options)
    new, report = run_passes(original, steps)
    assert report is not None  # the pipeline always starts with expand
    check_no_new_nonfinite(new, bool(bad_weights), "expand")
    for message in report.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    return _written_or_in_memory(new, model, output), report


def convert(
    model: ModelLike, format: str, output: str | os.PathLike | None = None,
) -> tuple[onnx.ModelProto, LowerReport]:
    """Store an expanded ``dense`` model (as ``expand`` writes it by default, or ``finetune`` after training
    it) in another ``format`` (:mod:`neurorewrite.passes.lower`): the same function, the same stored
    nonzeros. With ``output`` the model is written atomically (never over an input), as ``expand`` does.
    """
    where = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    if output is not None:
        _check_output(model, output, [])
    expanded = load_model(model, warn=False, spill=True)
    record = read_record(expanded, where)
    if record is None:
        raise InvalidOptionError(f"{where} carries no FPE record (it was not expanded by neurorewrite): run"
                                 " neurorewrite expand on it, with --format to choose how it is stored")
    if record.format != "dense":
        raise InvalidOptionError(f"{where} is stored as {record.format}; convert reads the dense format only: expand"
                                 f" the original model with --format {format}, or convert its dense file")
    new, report = lower_model(expanded, format)
    return _written_or_in_memory(new, model, output), report


def _check_output(model: ModelLike, output: str | os.PathLike, files: list[Labeled]) -> None:
    """Refuse an ``output`` that would replace the model's files or the other input ``files``, or whose folder
    cannot take it (``docs/robustness.md``)."""
    inputs: list[Labeled] = [] if isinstance(model, onnx.ModelProto) else list(model_files(model))
    check_no_overwrite(inputs + files, replaced_files(output))
    check_output_folder(output, "-o")


def _written_or_in_memory(new: onnx.ModelProto, model: ModelLike, output: str | os.PathLike | None) -> onnx.ModelProto:
    """``new`` saved to ``output`` (external data when the input had it), or made self-contained in memory."""
    if output is not None:
        external = not isinstance(model, onnx.ModelProto) and stored_with_external_data(model)
        save_model(new, output, external_data=True if external else None)
        return new
    new = materialize(new)  # a self-contained ModelProto: no tensor left in this process's spill files
    _check_in_memory(new)
    return new


SEED_LIMIT = 2**63  # numpy and torch both take seeds in 0 .. 2**63 - 1


def check_seed(seed: object, option: str = "--seed") -> int:
    """``seed`` as an int in ``0 .. 2**63 - 1``, or an InvalidOptionError naming ``option``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidOptionError(f"{option} must be an integer in 0..{SEED_LIMIT - 1}, got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise InvalidOptionError(f"{option} must be an integer in 0..{SEED_LIMIT - 1}, got {seed}")
    return int(seed)


def check_no_new_nonfinite(model: onnx.ModelProto, input_had_any: bool, command: str) -> None:
    """A command never writes a NaN/inf weight it introduced: when the input's weights were all finite,
    any non-finite weight in the result is a VerificationError and nothing is written."""
    if input_had_any:
        return  # already reported when the input was loaded; copies of those values are not new
    found = nonfinite_weights(model)
    if found:
        name, count = found[0]
        raise VerificationError(f"{command}: the result holds {count} NaN/infinite value(s) in {name} although the "
                                "input's weights are finite; nothing was written")


def _check_memory(
    model: onnx.ModelProto, layers: Sequence[str] | None, alpha: int,
    sample: Mapping[str, np.ndarray] | None, tied: bool, options: CalibrateOptions | None = None,
) -> None:
    """Refuse an expansion (and calibration) that cannot fit this machine, with the figure.

    A lower bound, not a forecast: the expanded weights of every selected block held at once, and for
    a calibration that refits W2 the system of the widest refit layer as ``passes.calibrate`` streams
    it, ``H' = alpha * H`` inputs wide (``H`` when children are tied or refit per parent): one chunk of
    hidden activations (float32, and float64 in the accumulation), the solver's working copies of W2'
    (float32), and either the ``(H'+1)^2`` float64 Gram matrix (and, per child, the float32 inverse
    Cholesky factor that chooses the support) or, for a sample of ``n`` rows with
    ``n (n + 1) / 2 <= H'``, the rows themselves and the row-space solve's chunks
    (:mod:`neurorewrite.fpe.refit`).
    """
    blocks, _ = select_blocks(find_blocks(model), list(layers) if layers else None)
    if not blocks:
        return
    itemsize = 4
    expanded = sum(alpha * b.width * (b.in_features + b.out_features) * itemsize for b in blocks)
    check_fits(weight_bytes(model) + expanded, f"--alpha {alpha} (expanded weights of {len(blocks)} block(s))",
               "use a smaller --alpha or --layers")
    if sample is None:
        return
    options = options or _default_calibrate_options()  # imports torch: only with a sample
    if options.refit == "none":
        return
    # rows at a block: every position of integer (token) inputs, every vector of float ones
    rows = max((a.size if a.dtype.kind in "iub" else a.size // max(1, a.shape[-1]) if a.ndim else 1)
               for a in sample.values())
    widest = max(blocks, key=lambda b: b.width)
    per_parent = tied or options.refit_per == "parent"
    refit = widest.width * (1 if per_parent else alpha)
    out, pairs = widest.out_features, rows * (rows + 1) // 2
    if keeps_rows(rows, refit):  # the rows, centred and not, and three working chunks of the row-space solve
        system = 16 * rows * refit + 3 * 8 * min(CHUNK_ELEMENTS, out * max(pairs, rows * rows, refit))
        copies = 2 * 4 * out * refit
    else:
        system, copies = 8 * (refit + 1) ** 2, 7 * 4 * out * refit  # CG: iterate, residual, direction, ...
        if not per_parent and options.support == "hessian":  # fpe/support.py: the damped Gram's inverse factor
            system += 4 * refit**2 + 12 * out * refit
    need = system + copies + 12 * min(rows, options.chunk_rows) * widest.width * alpha
    hint = "use a smaller --alpha, --structured, --layers" + ("" if per_parent else ", or --refit-per parent")
    check_fits(need, f"--alpha {alpha} with --calibrate (block {widest.name}: a least-squares fit over {refit} "
               f"hidden units and {rows} sample rows)", hint + " (or --refit none: the sample then only informs the prune)")


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
        stats = None  # measured once: the activation-aware prune and the tiered split both read them
        if (prune_by == "activation" or cfg.split == "tiered") and sample is not None and cfg.alpha > 1:
            from neurorewrite.passes.activation_stats import activation_scales  # torch: only when asked

            chosen, _ = select_blocks(find_blocks(m), list(layers) if layers else None)
            options = calibrate_options or _default_calibrate_options()
            stats = activation_scales(m, chosen, sample, "--calibrate", options.holdout, options.chunk_rows, options.mask_input)
        scales = stats if prune_by == "activation" else None
        inputs = {name: s.in_columns for name, s in stats.items()} if stats and cfg.split == "tiered" else None
        return expand_model(m, cfg, list(layers) if layers else None, progress, where, scales, inputs)

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


def default_split(split: str | None, has_sample: bool, structured: bool = False) -> str:
    """``split``, or by default ``tiered`` with a sample (it wins most back: ``docs/methods.md`` 1.3c) and
    ``random`` without one or for ``--structured`` (which needs one partition for all neurons)."""
    if split is not None:
        return split
    return "tiered" if has_sample and not structured else "random"


def default_lead_share(lead_share: float | None, split: str, has_sample: bool) -> float | None:
    """``lead_share``, or by default :data:`DEFAULT_LEAD_SHARE` for the ``tiered`` split with a sample (the
    calibration then refits the lead child to its parent's whole pre-activation, and the larger its share
    of the inputs, the closer: ``docs/methods.md`` 1.3c), balanced tiers (None) otherwise."""
    if lead_share is not None:
        return lead_share
    return DEFAULT_LEAD_SHARE if split == "tiered" and has_sample else None


def check_prune_by(prune_by: str | None, has_sample: bool, split: str = "random") -> str:
    """``prune_by`` checked; by default ``activation`` with a sample, ``magnitude`` without a sample or
    with the ``tiered`` split (whose ranking already reads the sample, and which the activation-aware
    prune made worse on all-MiniLM-L6-v2: ``docs/methods.md`` 1.3c)."""
    if prune_by is None:
        return "activation" if has_sample and split != "tiered" else "magnitude"
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
        check_in_memory(model, "the expanded model", full_check=True)


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
    proto = load_model(model, spill=True)
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
    """``model.onnx`` -> ``model.<tag>.onnx`` beside it (``model.fpe.onnx`` by default); never the input."""
    return tagged_output(path, tag)
