"""Shape arithmetic around a hidden layer: which small int64 computations depend on its width.

Exporters compute reshape targets and split points from ``Shape`` nodes and constants: GPT-2's
Conv1D reshapes its hidden tensor to ``[B, S, 128]`` with ``128`` a constant (TorchScript) or an
initializer (dynamo), and to ``[-1, 128]`` with ``128`` read back by ``Shape``; Phi-3's TorchScript
export cuts its fused gate/up output at ``ceil(n / 2)`` computed from ``Shape``. Widening a block from
``H`` to ``alpha * H`` hidden units is only safe when every such value either follows the width or is
rewritten with it.

:class:`ShapeValues` evaluates those computations with the width as a variable: the shape of a
widened tensor is ``(?, ..., ?, factor * W)``, every dimension of any other tensor is an unknown that
does not depend on ``W``, and the ops are the handful exporters use for shapes (Shape, Gather, Slice,
Squeeze, Unsqueeze, Concat, arithmetic, Cast). :func:`profile` evaluates a tensor at two widths, so a
caller can tell a value that follows the width (``[.., H]`` then ``[.., 3H]``) from one that holds it
as a constant (``H`` both times) or mixes it into something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.patterns import Reason

Elem = int | None  # None: an unknown value that does not depend on the hidden width

# ops that compute on shape vectors (their outputs are shape values too)
SHAPE_OPS = {"Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Add", "Sub", "Mul", "Div", "Cast", "Identity",
             "Max", "Min", "Neg", "Abs", "Reshape", "Shape"}
PROBE = 3  # the second width tried is PROBE times the first


class _Unknown(Exception):
    """The value cannot be evaluated (an op or input this module does not model)."""


@dataclass(frozen=True)
class Vec:
    """A small int64 value: a vector (``items``; None when even its length is unknown) or a scalar."""

    items: tuple[Elem, ...] | None
    scalar: bool = False


@dataclass(frozen=True)
class Widened:
    """A tensor whose last dimension is ``factor * W`` (``rank`` None: unknown)."""

    rank: int | None
    factor: int = 1


class ShapeValues:
    """Evaluates shape computations at hidden width ``width``, given the widened tensors."""

    def __init__(self, index: GraphIndex, widened: dict[str, Widened], width: int, rank_guess: int = 3) -> None:
        self.index, self.widened, self.width, self.rank_guess = index, widened, width, rank_guess
        self.memo: dict[str, Vec] = {}

    def value(self, tensor: str, depth: int = 0) -> Vec:
        if tensor in self.memo:
            return self.memo[tensor]
        if depth > 64:
            raise _Unknown(tensor)
        const = self.index.constant_value(tensor) if self.index.constant_source(tensor) in ("initializer", "constant") else None
        if const is not None:
            if const.dtype.kind not in "iu" or const.ndim > 1:
                raise _Unknown(tensor)
            out = Vec((int(const),), True) if const.ndim == 0 else Vec(tuple(int(v) for v in const))
        else:
            i = self.index.producer.get(tensor)
            if i is None:
                raise _Unknown(tensor)
            out = self._node(i, tensor, depth)
        self.memo[tensor] = out
        return out

    def _shape_of(self, tensor: str) -> Vec:
        if tensor in self.widened:
            w = self.widened[tensor]
            rank = w.rank if w.rank is not None else self.rank_guess
            return Vec((None,) * (rank - 1) + (w.factor * self.width,))
        rank = self.index.ranks.get(tensor)
        return Vec(None if rank is None else (None,) * rank)

    def _node(self, i: int, tensor: str, depth: int) -> Vec:
        node = self.index.graph.node[i]
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in SHAPE_OPS:
            raise _Unknown(tensor)
        args = [self.value(t, depth + 1) if t else None for t in (node.input[1:] if op == "Shape" else node.input)]
        if op == "Shape":
            vec = self._shape_of(node.input[0])
            start, end = get_attr(node, "start", 0), get_attr(node, "end", None)
            if vec.items is None:
                return vec
            return Vec(vec.items[int(start) : None if end is None else int(end)])
        if op in ("Cast", "Identity"):
            return args[0]
        if op == "Reshape":
            data = args[0]
            return Vec(None if data.items is None else data.items, scalar=False)
        if op == "Gather":
            return _gather(args[0], args[1], int(get_attr(node, "axis", 0)))
        if op == "Slice":
            return _slice(args, node, self.index)
        if op == "Squeeze":
            if args[0].items is not None and len(args[0].items) == 1:
                return Vec(args[0].items, True)
            raise _Unknown(tensor)
        if op == "Unsqueeze":
            if args[0].scalar:
                return Vec(args[0].items)
            raise _Unknown(tensor)
        if op == "Concat":
            if any(a.items is None for a in args):
                return Vec(None)
            return Vec(tuple(e for a in args for e in a.items))
        return _arith(op, args)


def _known_ints(vec: Vec | None) -> list[int]:
    if vec is None or vec.items is None or any(e is None for e in vec.items):
        raise _Unknown("not constant")
    return [int(e) for e in vec.items]  # type: ignore[arg-type]


def _gather(data: Vec, indices: Vec, axis: int) -> Vec:
    if axis != 0:
        raise _Unknown("gather axis")
    idx = _known_ints(indices)
    if data.items is None:
        return Vec((None,) * len(idx), indices.scalar) if not indices.scalar else Vec((None,), True)
    picked = tuple(data.items[k] for k in idx)
    return Vec(picked, indices.scalar)


def _slice(args: list[Vec | None], node: object, index: GraphIndex) -> Vec:
    data = args[0]
    starts, ends = _known_ints(args[1]), _known_ints(args[2])
    axes = _known_ints(args[3]) if len(args) > 3 and args[3] is not None else [0]
    steps = _known_ints(args[4]) if len(args) > 4 and args[4] is not None else [1]
    if axes not in ([0], [-1]) or len(starts) != 1 or len(ends) != 1:
        raise _Unknown("slice")
    if data is None or data.items is None:
        return Vec(None)
    return Vec(data.items[slice(starts[0], ends[0], steps[0])])


def _arith(op: str, args: list[Vec | None]) -> Vec:
    a, b = (args + [None])[:2]
    if op in ("Neg", "Abs"):
        if a is None or a.items is None:
            return Vec(None)
        fn1 = (lambda x: -x) if op == "Neg" else abs
        return Vec(tuple(None if e is None else fn1(e) for e in a.items), a.scalar)
    if a is None or b is None:
        raise _Unknown(op)
    if a.items is None or b.items is None:
        return Vec(None)
    n = max(len(a.items), len(b.items))
    if min(len(a.items), len(b.items)) not in (1, n):
        raise _Unknown("broadcast")
    xs = a.items if len(a.items) == n else a.items * n
    ys = b.items if len(b.items) == n else b.items * n
    return Vec(tuple(_apply(op, x, y) for x, y in zip(xs, ys)), a.scalar and b.scalar)


def _apply(op: str, x: Elem, y: Elem) -> Elem:
    if x is None or y is None:
        return None
    if op == "Add":
        return x + y
    if op == "Sub":
        return x - y
    if op == "Mul":
        return x * y
    if op == "Div":
        if y == 0:
            raise _Unknown("division by zero")
        return int(np.trunc(x / y))  # ONNX integer Div truncates
    if op == "Max":
        return max(x, y)
    return min(x, y)


def profile(index: GraphIndex, tensor: str, widened: dict[str, Widened], width: int) -> tuple[Vec, Vec] | None:
    """``tensor``'s value at hidden width ``width`` and at ``PROBE * width`` (None: it cannot be evaluated).

    A widened tensor of unknown rank is tried as rank 2, 3 and 4; the values must agree.
    """
    guesses = (2, 3, 4) if any(w.rank is None for w in widened.values()) else (3,)
    seen: tuple[Vec, Vec] | None = None
    for guess in guesses:
        try:
            pair = (ShapeValues(index, widened, width, guess).value(tensor),
                    ShapeValues(index, widened, PROBE * width, guess).value(tensor))
        except (_Unknown, IndexError, ValueError, OverflowError):
            return None
        if seen is not None and pair != seen:
            return None
        seen = pair
    return seen


def follows(pair: tuple[Vec, Vec], k: int, width: int) -> bool:
    """Element ``k`` of the profiled value is the width itself (``width`` then ``PROBE * width``)."""
    a, b = pair
    return a.items is not None and b.items is not None and a.items[k] == width and b.items[k] == PROBE * width


def constant_at(pair: tuple[Vec, Vec], k: int) -> int | None:
    """Element ``k`` when it is the same known value at both widths, else None."""
    a, b = pair
    if a.items is None or b.items is None or a.items[k] is None or a.items[k] != b.items[k]:
        return None
    return a.items[k]


def width_free(pair: tuple[Vec, Vec]) -> bool:
    """The value does not change with the width."""
    return pair[0] == pair[1]


# --- the verdicts block detection asks for -------------------------------------------------------------


@dataclass(frozen=True)
class ReshapeVerdict:
    """A Reshape inside a hidden region keeps the width last: its target ``follows`` the width
    (nothing to do) or holds it as a ``constant`` (the target is rewritten when widening)."""

    follows: bool


def reshape_verdict(index: GraphIndex, i: int, widened: dict[str, Widened], width: int, in_rank: int | None) -> ReshapeVerdict | Reason:
    """Whether Reshape node ``i`` (whose data input is a widened tensor) only moves leading dimensions."""
    node = index.graph.node[i]
    label = node_label(node, i)
    pair = profile(index, node.input[1], widened, width)
    if pair is None or pair[0].items is None or pair[1].items is None or not pair[0].items:
        return Reason("shape", f"Reshape node {label}: cannot tell that its target keeps the hidden width last")
    a, b = pair
    if len(a.items) != len(b.items) or a.items[:-1] != b.items[:-1]:
        return Reason("shape", f"Reshape node {label} moves the hidden width into a leading dimension")
    allow_zero = int(get_attr(node, "allowzero", 0))
    for k, e in enumerate(a.items[:-1]):
        if e == 0 and not allow_zero and (in_rank is None or k >= in_rank - 1):
            return Reason("shape", f"Reshape node {label} copies input dimension {k}, which may be the hidden width")
    if follows(pair, -1, width):
        return ReshapeVerdict(follows=True)
    if constant_at(pair, -1) == width:
        return ReshapeVerdict(follows=False)
    return Reason("shape", f"Reshape node {label}: its target's last dimension is not the hidden width {width}")


def shape_closure(index: GraphIndex, start: str) -> tuple[list[int], list[tuple[int, int, str]]]:
    """The shape-arithmetic nodes computed from ``start`` (a Shape output) and where their values leave
    them: ``(nodes, exits)`` with exits ``(consumer node, input slot, tensor)``; a graph output is
    an exit with node -1."""
    nodes: list[int] = []
    exits: list[tuple[int, int, str]] = []
    frontier, seen = [start], {start}
    while frontier:
        t = frontier.pop()
        if t in index.graph_outputs:
            exits.append((-1, 0, t))
        for c in index.consumers.get(t, []):
            node = index.graph.node[c]
            slots = [s for s, name in enumerate(node.input) if name == t]
            data_only = node.op_type in ("Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze")
            inner = node.domain in ("", "ai.onnx") and node.op_type in SHAPE_OPS - {"Shape"} and not (
                data_only and slots != [0])
            if not inner:
                exits += [(c, s, t) for s in slots]
                continue
            if c not in nodes:
                nodes.append(c)
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    frontier.append(out)
    return nodes, exits


def shape_reader_problem(
    index: GraphIndex, shape_node: int, widened: dict[str, Widened], width: int, allowed: set[tuple[int, int]],
) -> Reason | None:
    """Why Shape node ``shape_node`` (reading a widened tensor) would break when the width changes:
    a value computed from it that depends on the width reaches a node input not in ``allowed``."""
    node = index.graph.node[shape_node]
    label = node_label(node, shape_node)
    _, exits = shape_closure(index, node.output[0])
    for consumer, slot, tensor in exits:
        if (consumer, slot) in allowed:
            continue
        pair = profile(index, tensor, widened, width)
        if pair is not None and width_free(pair):
            continue
        where = "a graph output" if consumer < 0 else (
            f"{index.graph.node[consumer].op_type} node {node_label(index.graph.node[consumer], consumer)}")
        return Reason("shape", f"Shape node {label} reads the hidden width of {node.input[0]} and passes it to {where}")
    return None
