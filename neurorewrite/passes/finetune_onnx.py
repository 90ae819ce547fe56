"""The fine-tuning pass: train an (FPE-expanded) ONNX MLP with its masks fixed.

Replaces the weights of every linear layer that has constant, unshared weights with weights trained
on ``(x, y)`` by torch, keeping each layer's nonzero pattern exactly (pruned weights stay zero, kept
ones stay nonzero). Before: the graph has one float input and only ops that
:mod:`neurorewrite.models.onnx_ops` lifts; the lifted torch module reproduces onnxruntime's output.
After: same graph, same initializer shapes, the same nonzero count per layer, the FPE record in
``metadata_props`` kept, plus a ``neurorewrite.finetune`` record. The input model is never
modified. Place in the pipeline: not a step of ``expand``: it runs, as its own command
(``neurorewrite finetune``), on a model ``expand`` wrote in the dense format (a lowered format's
weights are not lifted). Without labels, :mod:`neurorewrite.passes.distill_onnx` trains against the
original model instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from neurorewrite.errors import DataError, VerificationError
from neurorewrite.executor import plain_session
from neurorewrite.models.masked_training import Progress, default_loss, finetune, make_optimizer
from neurorewrite.models.onnx_module import OnnxMLP
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.record import write_json_metadata

FINETUNE_KEY = "neurorewrite.finetune"
LIFT_TOLERANCE = 1e-4  # relative to the output scale; float32 reordering stays far below it


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 25
    lr: float = 1e-3
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    nnz_before: int
    nnz_after: int


@dataclass
class FinetuneReport:
    loss: str
    samples: int
    options: FinetuneOptions
    loss_before: float = 0.0
    loss_after: float = 0.0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    epoch_losses: list[float] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_data(lifted: OnnxMLP, x: np.ndarray, y: np.ndarray, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors for training, or a DataError naming the mismatch between the data and the model."""
    x, y = np.asarray(x), np.asarray(y)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise DataError(f"{where}: x has dtype {x.dtype}; the inputs must be numbers")
    integer = np.issubdtype(y.dtype, np.integer)
    if not (integer or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: y has dtype {y.dtype}; give integer labels (cross-entropy) or float targets (MSE)")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DataError(f"{where}: x has {len(x) if x.ndim else 0} samples but y has {len(y) if y.ndim else 0}; they must match")
    if len(x) == 0:
        raise DataError(f"{where}: the training data is empty")
    expected = lifted.input_shape
    if len(expected) != x.ndim or any(e is not None and e != d for e, d in zip(expected[1:], x.shape[1:])):
        raise DataError(f"{where}: x has shape {list(x.shape)} but the model input {lifted.input_name} expects {list(expected)}")
    dtype = next(iter(lifted.layers.values())).weight.dtype
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    yt = torch.from_numpy(np.ascontiguousarray(y.astype(np.int64) if integer else y)).to(torch.int64 if integer else dtype)
    with torch.no_grad():
        out = lifted(xt[:2])
    if not integer and tuple(yt.shape[1:]) != tuple(out.shape[1:]):
        raise DataError(f"{where}: float targets y have shape {list(y.shape)} but the model output is {list(out.shape)}")
    if integer and (y.ndim != 1 or out.ndim != 2 or y.min() < 0 or y.max() >= out.shape[1]):
        raise DataError(
            f"{where}: integer labels y need shape (N,) with values in 0..{out.shape[-1] - 1} "
            f"(the model output is {list(out.shape)}); got shape {list(y.shape)}, values {y.min()}..{y.max()}"
        )
    return xt, yt


def check_lift(model: onnx.ModelProto, lifted: OnnxMLP, x: torch.Tensor, where: str) -> None:
    """The lifted module must compute what onnxruntime computes, or nothing is trained."""
    sample = x[:64]
    session = plain_session(model, threads=1)
    feed = sample.numpy().astype(np.float32 if session.get_inputs()[0].type == "tensor(float)" else np.float64)
    ref = session.run([lifted.output_name], {lifted.input_name: feed})[0]
    with torch.no_grad():
        got = lifted(sample).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    if got.shape != ref.shape or float(np.abs(got - ref).max()) > LIFT_TOLERANCE * scale:
        raise VerificationError(f"{where}: the torch copy of the graph does not match onnxruntime; nothing was trained")


def _evaluate(lifted: OnnxMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
    _, loss = default_loss(y)
    with torch.no_grad():
        out = lifted(x)
        value = float(loss(out, y))
    if y.dtype.is_floating_point:
        return value, None
    return value, float((out.argmax(dim=1) == y).float().mean())


def finetune_model(
    model: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    options: FinetuneOptions = FinetuneOptions(),
    progress: Progress | None = None,
    where: str = "model",
) -> tuple[onnx.ModelProto, FinetuneReport]:
    """Train the linear layers of ``model`` on ``(x, y)`` with masks fixed; see the module docstring."""
    torch.manual_seed(options.seed)
    lifted = OnnxMLP(model, where)
    xt, yt = check_data(lifted, x, y, where)
    check_lift(model, lifted, xt, where)
    before = {key: layer.nonzeros() for key, layer in lifted.layers.items()}
    report = FinetuneReport(default_loss(yt)[0], len(xt), options)
    report.loss_before, report.accuracy_before = _evaluate(lifted, xt, yt)
    generator = torch.Generator().manual_seed(options.seed)
    dataset = torch.utils.data.TensorDataset(xt, yt)
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(lifted, options.optimizer, options.lr, options.weight_decay, options.momentum)
    result = finetune(lifted, loader, options.epochs, optimizer, progress=progress)
    report.epoch_losses = result.epoch_losses
    updates = []
    for (lin, w, b), key in zip(lifted.weights(), lifted.layers):
        after = int(np.count_nonzero(w)) + (0 if b is None else int(np.count_nonzero(b)))
        if after != before[key]:
            raise VerificationError(f"{where}: {lin.name} has {after} nonzeros after training, {before[key]} before")
        report.layers.append(LayerReport(lin.name, (w.shape[0], w.shape[1]), before[key], after))
        updates.append(NewWeights(lin, w, b))
    report.loss_after, report.accuracy_after = _evaluate(lifted, xt, yt)
    new = replace_weights(model, updates)
    record = {"epochs": options.epochs, "loss": report.loss, "samples": report.samples, **asdict(options)}
    write_json_metadata(new, FINETUNE_KEY, record)
    return new, report
