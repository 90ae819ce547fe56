"""Import an ONNX model into Relax, mapping ``ai.neurorewrite.SparseLinear`` to the project's kernels.

The stock Relax ONNX frontend knows only standard operators. :class:`_Importer` extends it with one
converter: each SparseLinear node becomes a ``call_tir`` of one of the project's kernels, its weights
repacked as constants (the sparsity pattern is fixed, so every kernel is specialised on it). On a CPU:

- 8 rows or more: column-blocked ELL (``kernels/blocked_rows.py``) between two tiled transposes;
- fewer rows: labeled parent tiles for FPE children, or dense tiles, when they cost less than
  gathering the nonzeros (``kernels/labeled_tiles.py``), else sliced ELL with hardware gathers
  (``kernels/gather_gemv.py``);
- no gather instruction, and on CUDA: the TensorIR ELL kernel (``kernels/sparse_linear.py``), which
  MetaSchedule tunes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import tvm
import tvm.relax.frontend.onnx
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from neurorewrite.errors import InvalidOptionError, ModelLoadError, last_line
from neurorewrite.kernels.blocked_rows import ROW_TILE, blocked_ell_from_csr, blocked_rows_func, padded_rows
from neurorewrite.kernels.ell import ell_from_csr, sliced_ell_from_csr
from neurorewrite.kernels.gather_gemv import gather_gemv_func, gather_lanes
from neurorewrite.kernels.labeled_tiles import LabeledTiles, labeled_gemv_func, labeled_tiles_from_csr, prefer_labeled
from neurorewrite.kernels.sparse_linear import EllShape, ell_linear_func, schedule_default
from neurorewrite.kernels.transpose import transpose_func
from neurorewrite.passes.lower_sparse import OP
from neurorewrite.rewriter.edit import read_metadata

SPARSE_OPS = (OP,)


class _Importer(onnx_frontend.ONNXGraphImporter):
    def __init__(self, shape_dict: dict, target: tvm.target.Target, scheduled: bool, alpha: int) -> None:
        super().__init__(shape_dict, "float32")
        self._target = target
        self._scheduled = scheduled
        self._alpha = alpha  # the model's FPE alpha: rows in runs of alpha may be one parent's children
        self._node = ""  # the SparseLinear being converted, for the report
        self.kernels: list[dict[str, object]] = []  # one row per SparseLinear: which kernel runs it

    def _used(self, kernel: str, shape: EllShape, nonzeros: int) -> None:
        self.kernels.append({"node": self._node, "kernel": kernel, "rows": shape.n, "in_features": shape.in_features,
                             "out_features": shape.out_features, "nonzeros": nonzeros})

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
        return super()._convert_operator(op_name, inputs, attrs, opset)

    def _sparse_linear(self, inputs: list, attrs: dict) -> relax.Expr:
        name = attrs["tvm_custom"]["name"] or "SparseLinear"
        self._node = name
        fmt = attrs.get("format", b"csr")
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        if fmt != "csr":
            raise ModelLoadError(f"SparseLinear {name}: format {fmt!r} is not supported by the TVM path (only csr)")
        consts = [_constant(inputs[i], name, role) for i, role in ((1, "values"), (2, "indices"), (3, "indptr"))]
        bias = _constant(inputs[4], name, "bias") if len(inputs) > 4 and inputs[4] is not None else None
        d, o = int(attrs["in_features"]), int(attrs["out_features"])
        ell = ell_from_csr(*consts, in_features=d, where=f"SparseLinear {name}")
        if ell.out_features != o:
            raise ModelLoadError(f"SparseLinear {name}: indptr has {ell.out_features} rows, out_features is {o}")
        x = inputs[0]
        dims = [_static_dim(v, name) for v in x.ty.shape]
        n = math.prod(dims[:-1])
        shape = EllShape(n, d, o, ell.width, str(ell.indices.dtype))
        lanes = gather_lanes(self._target)
        cpu = self._target.kind.name == "llvm"
        if cpu and shape.layout == "rows":  # fewer rows go to the small-batch kernels
            return self._blocked_linear(x, dims, consts, bias, shape)
        if cpu:
            tiles = self._labeled_tiles(consts, bias, shape)
            if tiles is not None:
                return self._labeled_linear(x, dims, tiles, shape, lanes or 4, consts[0].size)
        if shape.layout == "cols" and lanes:
            return self._gather_linear(x, dims, consts, bias, shape, lanes, name)
        if shape.layout == "cols":
            ell = ell.transposed()
        func = ell_linear_func(shape)
        if self._scheduled:
            func = schedule_default(func, self._target)
        self._used(f"TensorIR ELL ({shape.layout})", shape, int(consts[0].size))
        gv = self.bb.add_func(func, "ell_linear")
        bb = self.bb
        xt = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(x, (n, d)))))
        yt = bb.emit(relax.call_tir(
            gv, [xt, relax.const(ell.values), relax.const(ell.indices)], relax.TensorType((o, n), "float32")
        ))
        y = relax.op.permute_dims(yt)
        if bias is not None:
            y = relax.op.add(bb.emit(y), relax.const(bias.astype(np.float32)))
        return relax.op.reshape(bb.emit(y), (*dims[:-1], o))

    def _labeled_tiles(self, csr: list[np.ndarray], bias: np.ndarray | None, shape: EllShape) -> LabeledTiles | None:
        """Dense parent tiles for this layer when they beat gathering its nonzeros (rows read as the
        model's FPE children when siblings have disjoint inputs, else as plain rows)."""
        for alpha in dict.fromkeys((self._alpha, 1)):
            parents = shape.out_features // alpha
            if shape.out_features % alpha or not prefer_labeled(csr[0].size, parents, shape.in_features, alpha):
                continue
            tiles = labeled_tiles_from_csr(*csr, in_features=shape.in_features, alpha=alpha, bias=bias)
            if tiles is not None:
                return tiles
        return None

    def _labeled_linear(self, x: relax.Expr, dims: list[int], tiles: LabeledTiles, shape: EllShape,
                        vector: int, nonzeros: int) -> relax.Expr:
        """Small batch on a CPU, dense enough: labeled parent tiles, no gathers, bias inside."""
        self._used(f"labeled tiles x{tiles.alpha}" if tiles.alpha > 1 else "dense tiles", shape, nonzeros)
        gv = self.bb.add_func(labeled_gemv_func(shape.n, tiles, vector), "labeled_tiles_linear")
        bb = self.bb
        arrays = [tiles.values] + ([] if tiles.labels is None else [tiles.labels]) + [tiles.bias]
        y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (shape.n, shape.in_features))),
                                        *(relax.const(a) for a in arrays)],
                                   relax.TensorType((shape.n, tiles.rows), "float32")))
        if tiles.rows != shape.out_features:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[shape.out_features]))
        return relax.op.reshape(y, (*dims[:-1], shape.out_features))

    def _gather_linear(self, x: relax.Expr, dims: list[int], csr: list[np.ndarray], bias: np.ndarray | None,
                       shape: EllShape, lanes: int, name: str) -> relax.Expr:
        """Small batch on a CPU with gathers: sliced-ELL kernel on the untransposed input, bias inside."""
        sell = sliced_ell_from_csr(*csr, in_features=shape.in_features, lanes=lanes, where=f"SparseLinear {name}")
        padded = np.zeros(sell.slices * lanes, dtype=np.float32)
        if bias is not None:
            padded[: shape.out_features] = bias.astype(np.float32)
        func = gather_gemv_func(shape.n, shape.in_features, sell.slices, sell.values.shape[0], lanes,
                                str(sell.indices.dtype))
        self._used("sliced-ELL gather", shape, int(csr[0].size))
        gv = self.bb.add_func(func, "sell_gather_linear")
        bb = self.bb
        consts = [relax.const(a) for a in (sell.values, sell.indices, sell.slice_ptr, padded)]
        y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (shape.n, shape.in_features))), *consts],
                                   relax.TensorType((shape.n, sell.slices * lanes), "float32")))
        if sell.slices * lanes != shape.out_features:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[shape.out_features]))
        return relax.op.reshape(y, (*dims[:-1], shape.out_features))

    def _blocked_linear(self, x: relax.Expr, dims: list[int], csr: list[np.ndarray], bias: np.ndarray | None,
                        shape: EllShape) -> relax.Expr:
        """8 rows or more on a CPU: column-blocked ELL with the bias inside the kernel; the rows are
        padded with zeros to the kernel's batch tile (a multiple of 16) and the padding sliced off."""
        ell = blocked_ell_from_csr(*csr, in_features=shape.in_features, index_type=shape.index_dtype)
        rows = padded_rows(shape.n)
        out = ell.row_tiles * ROW_TILE
        padded = np.zeros(out, dtype=np.float32)
        if bias is not None:
            padded[: shape.out_features] = bias.astype(np.float32)
        self._used("column-blocked ELL", shape, int(csr[0].size))
        gv = self.bb.add_func(blocked_rows_func(rows, ell), "blocked_ell_linear")
        bb = self.bb
        x2 = bb.emit(relax.op.reshape(x, (shape.n, shape.in_features)))
        if rows != shape.n:
            zeros = relax.const(np.zeros((rows - shape.n, shape.in_features), dtype=np.float32))
            x2 = bb.emit(relax.op.concat([x2, zeros], axis=0))
        xt = self._transpose(x2, rows, shape.in_features)
        consts = [relax.const(a) for a in (ell.values, ell.indices, ell.tile_ptr, padded)]
        yt = bb.emit(relax.call_tir(gv, [xt, *consts], relax.TensorType((out, rows), "float32")))
        y = self._transpose(yt, out, rows)
        if out != shape.out_features or rows != shape.n:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[shape.n, shape.out_features]))
        return relax.op.reshape(y, (*dims[:-1], shape.out_features))

    def _transpose(self, x: relax.Expr, rows: int, cols: int) -> relax.Expr:
        gv = self.bb.add_func(transpose_func(rows, cols), "tiled_transpose")
        return self.bb.emit(relax.call_tir(gv, [x], relax.TensorType((cols, rows), "float32")))


def _constant(expr: relax.Expr, node: str, role: str) -> np.ndarray:
    if not isinstance(expr, tvm.ir.expr.Constant):
        raise ModelLoadError(f"SparseLinear {node}: {role} must be a constant initializer for the TVM path")
    return expr.value.numpy()


def _static_dim(value: object, node: str) -> int:
    if isinstance(value, tvm.tirx.IntImm):
        return int(value)
    raise InvalidOptionError(f"SparseLinear {node}: input dimension {value} is not static; pass --shape NAME=D0,D1,...")


def input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Static shapes of the graph inputs: the model's own, with ``shapes`` filling symbolic dims."""
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
        if any(not d.HasField("dim_value") for d in dims):
            raise InvalidOptionError(f"input {i.name} has a symbolic dimension; pass --shape {i.name}=D0,D1,... "
                                     "(the kernels are specialised on static shapes)")
        out[i.name] = [d.dim_value for d in dims]
    return out


def import_model(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], target: tvm.target.Target, scheduled: bool
) -> tuple[tvm.IRModule, list[dict[str, object]]]:
    """The Relax module of ``model``; ``scheduled`` applies the untuned kernel schedule (else left to tuning)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    alpha = (read_metadata(model) or {}).get("alpha")
    importer = _Importer(dict(shapes), target, scheduled, alpha if isinstance(alpha, int) and alpha > 1 else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frontend warns on every custom-domain node
        try:
            mod = importer.from_onnx(model.graph, opset)
        except (InvalidOptionError, ModelLoadError):
            raise
        except Exception as e:  # the frontend raises assorted TVM and Python errors on graphs it cannot take
            raise ModelLoadError(f"TVM could not import the model: {last_line(e)}") from e
    return mod, importer.kernels
