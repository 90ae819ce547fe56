"""The distillation pass: train an expanded ONNX model, label-free, to give its original's outputs.

Replaces the weights of the expanded layers (the linears the FPE record names; every liftable linear
when the model has no record) with weights trained so that the student's outputs match the teacher's
on sample inputs (:func:`neurorewrite.models.distill.distill`: masks fixed, early stop on held-out
samples, best weights kept). With ``match="blocks"`` (default) the tensors the expanded blocks write
into (the residual sum after each block, or the block output) are matched too, so every block gets a
signal of its own. Both models are lifted whole into torch
(:class:`~neurorewrite.models.onnx_module.OnnxGraph`).

Before: the teacher has the student's inputs and outputs (names and types) and, where the student has
an FPE record, each expanded block's original width; the sample holds every model input. After: same
graph, same initializer shapes, the same nonzero count per layer (pruned weights stay 0.0), the FPE
record kept, a ``neurorewrite.finetune`` record added. The input models are never modified.
Place in the pipeline: after ``neurorewrite expand`` wrote a dense-format model, as its own command
(``neurorewrite finetune MODEL.fpe.onnx --teacher MODEL.onnx --data SAMPLE.npz``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from neurorewrite.errors import DataError, InvalidOptionError, VerificationError
from neurorewrite.models.distill import Progress, distill, distillation_loss
from neurorewrite.models.onnx_module import OnnxGraph
from neurorewrite.passes.calibrate import _residual_operand
from neurorewrite.passes.finetune_onnx import FINETUNE_KEY, LayerReport
from neurorewrite.passes.sample_chunks import MASK_INPUT, SampleArrays, holdout_indices, runs_trimmed
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears
from neurorewrite.rewriter.record import read_record, write_json_metadata

MATCHES = ("blocks", "outputs")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = 8
    lr: float = 1e-4
    batch_size: int = 16
    holdout: float = 0.2
    patience: int = 2
    match: str = "blocks"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    mask_input: str | None = MASK_INPUT

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise InvalidOptionError(f"--match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidOptionError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.batch_size < 1 or self.epochs < 0 or self.patience < 1 or not self.lr > 0:
            raise InvalidOptionError("--batch-size and --patience must be >= 1, --epochs >= 0, --lr > 0")


@dataclass
class DistillReport:
    samples: int
    holdout_samples: int
    options: DistillOptions
    matched: list[str] = field(default_factory=list)
    held_out_before: float = 0.0  # relative squared distance to the teacher (0 = equal)
    held_out_after: float = 0.0
    cosine_before: float | None = None  # mean cosine of the first output's rows to the teacher's, held out
    cosine_after: float | None = None
    history: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    steps: int = 0
    layers: list[LayerReport] = field(default_factory=list)
    loss: str = "distill"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Outputs(nn.Module):
    """``forward(**feeds)`` -> the named tensors of a lifted graph, in order."""

    def __init__(self, graph: OnnxGraph, names: Sequence[str]) -> None:
        super().__init__()
        self.graph, self.names = graph, list(names)

    def forward(self, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = self.graph.run(feeds)
        return tuple(env[n] for n in self.names)


def _signature(model: onnx.ModelProto) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input if i.name not in inits]
    return inputs, [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]


def check_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto, where: str) -> None:
    """The teacher must be the model the student was expanded from: same inputs and outputs and, per
    expanded block, the original width; else a one-line error."""
    s_in, s_out = _signature(student)
    t_in, t_out = _signature(teacher)
    if s_in != t_in or s_out != t_out:
        def names(sig: list[tuple[str, int]]) -> str:
            return ", ".join(n for n, _ in sig) or "none"

        raise DataError(f"{where}: the teacher's inputs ({names(t_in)}) and outputs ({names(t_out)}) differ from the "
                        f"student's ({names(s_in)}; {names(s_out)}): give the model the student was expanded from")
    record = read_record(student)
    if record is None:
        return
    linears = {lin.name: lin for lin in find_linears(GraphIndex.build(teacher.graph)).values()}
    for block in record.blocks:
        lin = linears.get(block.first)
        if lin is None or lin.out_features != block.width_before or lin.in_features != block.in_features:
            found = "missing" if lin is None else f"{lin.in_features} -> {lin.out_features}"
            raise DataError(f"{where}: the teacher is not the student's original: layer {block.first} is {found}, the "
                            f"student's record says the original was {block.in_features} -> {block.width_before}")


def _matched(student: onnx.ModelProto, teacher: onnx.ModelProto, match: str) -> list[str]:
    """The float graph outputs, then (``blocks``) per expanded block the tensor it writes into."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    names = [o.name for o in student.graph.output if o.type.tensor_type.elem_type in floats]
    record = read_record(student)
    if match == "blocks" and record is not None:
        index = GraphIndex.build(student.graph)
        t_index = GraphIndex.build(teacher.graph)
        for out in record.output_tensors:
            users = index.consumers.get(out, [])
            after = index.graph.node[users[0]].output[0] if _residual_operand(index, out) and users else out
            if (after in t_index.producer or after in t_index.graph_outputs) and after not in names:
                names.append(after)
    if not names:
        raise DataError("the model has no floating-point output to match")
    return names


def _batches(data: SampleArrays, members: np.ndarray, size: int, rng: np.random.Generator | None) -> list[dict]:
    """Batches of ``size`` samples (shuffled with ``rng``; else sorted by length), padding cut per batch."""
    order = rng.permutation(members) if rng is not None else members[np.argsort(data.lengths[members], kind="stable")]
    out = []
    for start in range(0, order.size, size):
        feeds, _, _ = data.feeds(np.sort(order[start : start + size]))
        out.append(feeds)
    return out


def _cosine(student: nn.Module, teacher: nn.Module, batches: list[dict], mask_input: str | None) -> float | None:
    """Mean cosine between the first output's rows (real positions) of student and teacher."""
    if not batches:
        return None
    total, count = 0.0, 0
    with torch.no_grad():
        for feeds in batches:
            s, t = student(**feeds)[0], teacher(**feeds)[0]
            mask = feeds.get(mask_input) if mask_input else None
            if mask is not None and s.dim() >= 3 and tuple(s.shape[:2]) == tuple(mask.shape):
                s, t = s[mask.bool()], t[mask.bool()]
            s, t = s.reshape(len(s), -1).double(), t.reshape(len(t), -1).double()
            cos = torch.nn.functional.cosine_similarity(s, t, dim=1)
            total, count = total + float(cos.sum()), count + len(cos)
    return total / count if count else None


def distill_model(
    student: onnx.ModelProto, teacher: onnx.ModelProto, sample: Mapping[str, np.ndarray],
    options: DistillOptions = DistillOptions(), progress: Progress | None = None, where: str = "--data",
) -> tuple[onnx.ModelProto, DistillReport]:
    """Distil ``student`` towards ``teacher`` on ``sample``; see the module docstring."""
    check_teacher(student, teacher, "--teacher")
    torch.manual_seed(options.seed)
    record = read_record(student)
    train = None if record is None else {n for b in record.blocks for n in (b.first, b.second)}
    names = _matched(student, teacher, options.match)
    lifted = OnnxGraph(student, "the student", train=train, outputs=names)
    lifted_teacher = OnnxGraph(teacher, "the teacher", outputs=names)
    model, reference = _Outputs(lifted, names), _Outputs(lifted_teacher, names)
    data = SampleArrays.build(lifted.inputs, sample, where, options.mask_input)
    if data.can_trim and not runs_trimmed(lifted_teacher, data.feeds(np.arange(min(4, data.samples)))[0]):
        data = SampleArrays.build(lifted.inputs, sample, where, options.mask_input, trim=False)
    held = holdout_indices(data.samples, options.holdout)
    fit = np.array([i for i in range(data.samples) if i not in held], dtype=np.int64)
    held_out = _batches(data, np.array(sorted(held), dtype=np.int64), max(options.batch_size, 32), None)
    rng = np.random.default_rng(options.seed)
    keys = [k for k, layer in lifted.layers.items() if any(p.requires_grad for p in layer.parameters())]
    before = {k: lifted.layers[k].nonzeros() for k in keys}
    # a tied layer (one layer under several keys: ALBERT's) is one set of parameters, stepped once
    params = list({id(p): p for k in keys for p in lifted.layers[k].parameters()}.values())
    if options.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=options.lr, weight_decay=options.weight_decay)
    else:
        cls = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(params, lr=options.lr, weight_decay=options.weight_decay)
    report = DistillReport(data.samples, len(held), options, names)
    report.cosine_before = _cosine(model, reference, held_out, data.mask_input)
    epoch_batches = [_batches(data, fit, options.batch_size, rng) for _ in range(options.epochs)]
    result = distill(model, reference, lambda epoch: epoch_batches[epoch], held_out, epochs=options.epochs,
                     optimizer=optimizer, patience=options.patience, loss=distillation_loss(reference), progress=progress)
    report.cosine_after = _cosine(model, reference, held_out, data.mask_input)
    for name in ("held_out_before", "held_out_after", "history", "epoch_losses", "best_epoch", "stopped_early", "steps"):
        setattr(report, name, getattr(result, name))
    updates = []
    for lin, w, b in lifted.weights(set(keys)):
        after = int(np.count_nonzero(w)) + (0 if b is None else int(np.count_nonzero(b)))
        key = lifted.key_of(lin.name)
        if after != before[key]:
            raise VerificationError(f"{where}: {lin.name} has {after} nonzeros after training, {before[key]} before")
        report.layers.append(LayerReport(lin.name, (w.shape[0], w.shape[1]), before[key], after))
        updates.append(NewWeights(lin, w, b))
    new = replace_weights(student, updates)
    write_json_metadata(new, FINETUNE_KEY, {"mode": "distill", "samples": data.samples, **asdict(options),
                                            "best_epoch": result.best_epoch})
    return new, report

