"""Import an ONNX model into Relax, mapping ``ai.neurorewrite.SparseLinear`` to the project's kernels.

The stock Relax ONNX frontend knows only standard operators. :class:`_Importer` extends it with one
converter: each SparseLinear node's CSR weight is checked (:func:`neurorewrite.ops.check_csr`) and
handed to the kernel registry (:mod:`neurorewrite.kernels.choice`), whose plan emits a ``call_tir`` of
one of the project's kernels with the weights repacked as constants (the sparsity pattern is fixed,
so every kernel is specialised on it). Which kernel runs when is the registry's business; the
report names it per node. Between sparse layers activations stay feature-major
(:mod:`neurorewrite.runtime.tvm_layout`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import tvm
import tvm.relax.frontend.onnx
from tvm import relax, topi
from tvm.relax.frontend.onnx import onnx_frontend

from neurorewrite.errors import InvalidOptionError, ModelLoadError, last_line
from neurorewrite.kernels.choice import Candidate, Choice, SparseLinearTask, candidates_for
from neurorewrite.kernels.dispatch import emit_layer
from neurorewrite.kernels.measure import PROBES, KernelRecords, choose
from neurorewrite.kernels.row_blocks import dense_prefix, row_block
from neurorewrite.kernels.transpose import emit_transpose
from neurorewrite.ops import OP, check_csr
from neurorewrite.rewriter.record import read_record
from neurorewrite.runtime.tvm_layout import FeatureMajor

SPARSE_OPS = (OP,)


class _Importer(onnx_frontend.ONNXGraphImporter):
    def __init__(self, shape_dict: dict, target: tvm.target.Target, scheduled: bool, alpha: int,
                 records: KernelRecords | None, measure: bool) -> None:
        super().__init__(shape_dict, "float32")
        self._target = target
        self._scheduled = scheduled
        self._alpha = alpha  # the model's FPE alpha: rows in runs of alpha may be one parent's children
        self._records = records
        self._measure = measure
        self.kernels: list[dict[str, object]] = []  # one row per SparseLinear: which kernel runs it
        self._layout = FeatureMajor(self.bb, target.kind.name == "llvm")

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        convert_map = onnx_frontend._get_convert_map()
        unsupported = sorted({
            n.op_type for n in graph.node
            if n.op_type not in convert_map and n.op_type not in SPARSE_OPS and n.op_type not in ("If", "Constant")
        })
        if unsupported:
            raise ModelLoadError(f"TVM's ONNX importer does not support operator(s) {', '.join(unsupported)}")

    def _convert_operator(self, op_name: str, inputs: list, attrs: dict, opset: int) -> relax.Expr:
        if op_name == OP:
            return self._sparse_linear(inputs, attrs)

        def convert(op: str, args: list) -> relax.Expr:
            if op == "ConstantOfShape":
                folded = _constant_of_shape(args[0], attrs.get("value"))
                if folded is not None:
                    return folded
            if op == "Erf" or (op == "Gelu" and _text(attrs.get("approximate", "none")) == "none"):
                x = args[0] if isinstance(args[0], relax.Var) else self.bb.emit(args[0])  # call_te needs its shape
                return _erf_gelu(self.bb, x) if op == "Gelu" else self.bb.emit(self.bb.call_te(topi.fast_erf, x))
            return super(_Importer, self)._convert_operator(op, args, attrs, opset)

        return self._layout.propagate(op_name, inputs, attrs, convert(op_name, inputs), convert)

    def _sparse_linear(self, inputs: list, attrs: dict) -> relax.Expr:
        name = attrs["tvm_custom"]["name"] or OP
        fmt = _text(attrs.get("format", b"csr"))
        if fmt != "csr":
            raise ModelLoadError(f"SparseLinear {name}: format {fmt!r} is not supported by the TVM path (only csr)")
        values, indices, indptr = (_constant(inputs[i], name, role) for i, role in ((1, "values"), (2, "indices"), (3, "indptr")))
        bias = _constant(inputs[4], name, "bias") if len(inputs) > 4 and inputs[4] is not None else None
        d, o = int(attrs["in_features"]), int(attrs["out_features"])
        csr = check_csr(values, indices, indptr, d, o, bias, where=f"SparseLinear {name}")
        x = inputs[0]
        dims = [_dim(v, name) for v in x.ty.shape]
        n = _product(dims[:-1])
        task = SparseLinearTask(name, d, o, csr.values, csr.indices, csr.indptr, bias, self._alpha, self._target)
        prefix = dense_prefix(csr.indptr, d)
        blocks = [task] if not prefix else [row_block(task, 0, prefix, f"{name}/dense rows"),
                                            row_block(task, prefix, o, f"{name}/sparse rows")]
        probes = (n,) if isinstance(n, int) else PROBES
        plans = []
        for block in blocks:
            candidates = candidates_for(block)
            choice = choose(block, candidates, probes, self._records, self._measure)
            plans.append((block, candidates, choice))
            self.kernels.append(_kernel_row(block, candidates, choice, n))
        twin = self._layout.get(x)
        if twin is not None and twin.features == (d,):  # the previous layer's output, still feature-major
            xt = twin.expr
        else:
            x2 = self.bb.emit(relax.op.reshape(x, (n, d)))
            xt = emit_transpose(self.bb, x2, n, d, self._target.kind.name == "llvm")
        parts = [emit_layer(self.bb, block, candidates, choice, xt, n, self._scheduled) for block, candidates, choice in plans]
        yt = parts[0] if len(parts) == 1 else self.bb.emit(relax.op.concat(parts, axis=0))
        return self._layout.sparse_output(yt, o, tuple(dims[:-1]))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _constant_of_shape(shape: relax.Expr, value: object) -> relax.Expr | None:
    """ConstantOfShape of a constant shape, as a constant (None for a computed shape). The frontend
    broadcasts the one-element value to the shape, which fails for an empty shape (a scalar output, as
    GPT-2's TorchScript export writes for its attention mask)."""
    if not isinstance(shape, tvm.ir.GenericConst):
        return None
    dims = shape.value.numpy()
    fill = onnx_frontend.get_numpy(value) if value is not None else np.zeros(1, np.float32)  # ONNX's default
    return relax.const(np.full([int(d) for d in dims.reshape(-1)], fill.reshape(-1)[0], fill.dtype), str(fill.dtype))


def _erf_gelu(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    """``x/2 (1 + erf(x/sqrt 2))`` with TOPI's polynomial erf. The stock conversion's erf is a scalar libm
    call per element: 2.8 ns an element on a Zen 4 core pair, a third of a calibrated GELU FFN's call at
    batch 32 (throwaway timings; a 3072 x 32 GELU: 270 us, against 49 us with the polynomial, whose
    largest error against scipy's erf on [-4, 4] was 7e-7)."""
    scaled = relax.op.multiply(x, relax.const(float(1 / np.sqrt(2)), "float32"))
    erf = bb.emit(bb.call_te(topi.fast_erf, bb.emit(scaled)))
    half = relax.op.multiply(x, relax.const(0.5, "float32"))
    return bb.emit(relax.op.multiply(half, relax.op.add(relax.const(1.0, "float32"), erf)))


def _kernel_row(task: SparseLinearTask, candidates: list[Candidate], choice: Choice, n: int | tvm.tirx.Expr) -> dict[str, object]:
    """The report's row for one kernel: which runs when, how it was chosen, what it reads per call."""
    by_name = {c.name: c for c in candidates}
    return {
        "node": task.name, "kernel": choice.describe(), "rows": n if isinstance(n, int) else str(n),
        "in_features": task.in_features, "out_features": task.out_features,
        "nonzeros": task.nonzeros, "choice": choice.source,
        "ranges": [[start, kernel] for start, kernel in choice.ranges],
        "timings_us": {k: {str(b): t for b, t in v.items()} for k, v in choice.timings_us.items()},
        # what each chosen kernel reads per call: its packed weights (bytes) and stored entries
        "weight_bytes": {k: sum(int(w.nbytes) for w in by_name[k].build()[1]) for k in choice.kernels},
    }


def _constant(expr: relax.Expr, node: str, role: str) -> np.ndarray:
    if not isinstance(expr, tvm.ir.expr.Constant):
        raise ModelLoadError(f"SparseLinear {node}: {role} must be a constant initializer for the TVM path")
    return expr.value.numpy()


def _dim(value: object, node: str) -> int | tvm.tirx.Expr:
    """A static dimension as an int; a symbolic one (the batch of a library for any batch) as it is."""
    if isinstance(value, tvm.tirx.IntImm):
        return int(value)
    if isinstance(value, tvm.tirx.Expr):
        return value
    raise ModelLoadError(f"SparseLinear {node}: input dimension {value} is unknown; pass --shape NAME=D0,D1,...")


def _product(dims: list) -> int | tvm.tirx.Expr:
    out: int | tvm.tirx.Expr = 1
    for d in dims:
        out = out * d if not (isinstance(out, int) and out == 1) else d
    return out


Shape = list[int | str]  # a symbolic dimension is its name (ONNX dim_param)


def input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Shape]:
    """Shapes of the graph inputs: ``shapes`` where given (static), else the model's own, whose
    symbolic dimensions stay symbolic (named; an unnamed one becomes ``INPUT_dimK``). A named symbolic
    dimension that a given shape fixes is fixed in every input that has it: ``--shape input_ids=1,128``
    fixes ``attention_mask``'s ``batch`` and ``sequence`` too."""
    shapes = dict(shapes or {})
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    unknown = sorted(set(shapes) - {i.name for i in graph_inputs})
    if unknown:
        raise InvalidOptionError(f"--shape names {', '.join(unknown)}, not an input of the model "
                                 f"(inputs: {', '.join(i.name for i in graph_inputs)})")
    out = {}
    for i in graph_inputs:
        dims = i.type.tensor_type.shape.dim
        if i.name in shapes:
            given = [int(v) for v in shapes[i.name]]
            if len(given) != len(dims) or any(d.HasField("dim_value") and d.dim_value != g for d, g in zip(dims, given)):
                model_dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                raise InvalidOptionError(f"--shape {i.name}={given} does not fit the model's shape {model_dims}")
            out[i.name] = given
            continue
        out[i.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{i.name}_dim{k}")
                       for k, d in enumerate(dims)]
    fixed: dict[str, tuple[int, str]] = {}  # symbolic dimension name -> its size, and the input that fixed it
    for i in graph_inputs:
        if i.name in shapes:
            for d, size in zip(i.type.tensor_type.shape.dim, out[i.name]):
                if d.dim_param and fixed.setdefault(d.dim_param, (int(size), i.name))[0] != size:
                    other = fixed[d.dim_param][1]
                    raise InvalidOptionError(f"--shape gives dimension {d.dim_param!r} size {size} for {i.name} but"
                                             f" {fixed[d.dim_param][0]} for {other}; the model says they are one size")
    for name, shape in out.items():
        out[name] = [fixed[d][0] if isinstance(d, str) and d in fixed else d for d in shape]
    return out


def symbolic_hint(shapes: Mapping[str, Shape]) -> str:
    """What to try when TVM fails on a model with symbolic input dimensions ("" when all are fixed)."""
    symbolic = sorted(name for name, shape in shapes.items() if not is_static(shape))
    if not symbolic:
        return ""
    return (f"; with symbolic dimensions TVM fails on the shape arithmetic of many exports (Hugging Face's): fix"
            f" them with --shape, e.g. --shape {symbolic[0]}=1,128")


def is_static(shape: Shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def _symbolic_inputs(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """``model`` with every input's symbolic dims named as in ``shapes`` (the importer reads the names)."""
    def unnamed(i: onnx.ValueInfoProto) -> bool:
        dims = i.type.tensor_type.shape.dim
        return any(not d.HasField("dim_value") and not d.dim_param for d in dims)

    if not any(i.name in shapes and not is_static(shapes[i.name]) and unnamed(i) for i in model.graph.input):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for i in named.graph.input:
        if i.name in shapes and not is_static(shapes[i.name]):
            for d, want in zip(i.type.tensor_type.shape.dim, shapes[i.name]):
                if isinstance(want, str):
                    d.dim_param = want


def import_model(
    model: onnx.ModelProto, shapes: Mapping[str, Shape], target: tvm.target.Target, scheduled: bool,
    records: KernelRecords | None = None, measure: bool = True,
) -> tuple[tvm.IRModule, list[dict[str, object]]]:
    """The Relax module of ``model``; ``scheduled`` applies the untuned kernel schedule (else left to tuning).

    ``records``: the tuning database's kernel records (read, and written with new measurements);
    ``measure`` False: the kernels are chosen by the static estimates, nothing is timed."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    record = read_record(model)
    static = {name: list(shape) for name, shape in shapes.items() if is_static(shape)}
    model = _symbolic_inputs(model, shapes)
    importer = _Importer(static, target, scheduled, 1 if record is None else max(1, record.alpha), records, measure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frontend warns on every custom-domain node
        try:
            mod = importer.from_onnx(model.graph, opset)
        except (InvalidOptionError, ModelLoadError):
            raise
        except Exception as e:  # the frontend raises assorted TVM and Python errors on graphs it cannot take
            raise ModelLoadError(f"TVM could not import the model: {last_line(e)}{symbolic_hint(shapes)}") from e
    # the row-major views of feature-major tensors that nothing reads (tvm_layout.py)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod, importer.kernels
