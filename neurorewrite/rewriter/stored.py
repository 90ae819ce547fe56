"""Reading back the forms the ``grouped`` format writes, so ``analyze`` and ``inspect`` see blocks in them.

Each form is a declared pattern over the nodes :mod:`neurorewrite.rewriter.lowering.grouped` and
:mod:`neurorewrite.rewriter.lowering.per_child` emit; a match is a read-only :class:`Linear`
whose effective weights :func:`read_stored` rebuilds in the order the graph holds the hidden units
(children-major for the batched forms, ``k * H + i``, so a permuted second linear lines up; the FPE
layout ``i * alpha + k`` for the per-child form, which has no hidden tensor; :func:`fpe_rows` gives the
way back to the FPE layout). The sparse format's ``SparseLinear`` is read in :mod:`.linear`.

- ``grouped``: ``Gather(x, cols) -> Reshape -> Transpose -> MatMul(blocks) [-> Add] -> Transpose -> Reshape``
  (the first linear of a batched block); ``grouped-fused``: a Concat of two of them (a fused gate/up);
- ``tied-sum``: ``Reshape(h, [.., alpha, H]) -> ReduceSum -> MatMul(W2) [-> Add]`` (children that share
  their parent's outgoing column, summed first);
- ``per-child`` (:func:`per_child_blocks`): ``Split``/``Gather`` of ``x``, one linear (gated: two) per
  child, a copy of the activation each, ``Sum``, then ``MatMul(W2)``: the lone tied block of
  ``--structured``. Its children's sum replaces the hidden tensor, so it has none to measure.
"""

from __future__ import annotations

import numpy as np

from neurorewrite.rewriter.activations import is_elementwise
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.linear import Linear, read_weights
from neurorewrite.rewriter.patterns import Const, Maybe, Op, Var, any_of, match

STORED_OPS = ("grouped", "grouped-fused", "tied-sum", "per-child", "tied-children")

_BATCHED = Op("MatMul", Op("Transpose", Op("Reshape", Op("Gather", Var("x"), Const("cols"), attrs={"axis": -1}, name="entry"),
                                            Const("split")), attrs={"perm": [1, 0, 2]}), Const("blocks"), name="linear")
GROUPED_FIRST = Op("Reshape", Op("Transpose", any_of(Op("Add", _BATCHED, Const("b"), name="add"), _BATCHED),
                                 attrs={"perm": [1, 0, 2]}), Var("shape"), name="out")
_TIED_MM = Op("MatMul", Op("ReduceSum", Op("Reshape", Var("x"), Op("Concat", Var("lead"), Const("tail")), name="entry"),
                           Maybe(Const("axes")), name="sum"), Const("w"), name="linear")
TIED_SUM = any_of(Op("Add", _TIED_MM, Const("b"), name="add", commutative=True), _TIED_MM)


def grouped_linear(index: GraphIndex, i: int) -> Linear | None:
    """The grouped first linear whose output Reshape is node ``i``, or None."""
    node = index.graph.node[i]
    m = match(index, GROUPED_FIRST, node.output[0])
    if not m:
        return None
    blocks = index.constant_shape(m["blocks"])
    cols = index.constant_value(m["cols"])
    if blocks is None or len(blocks) != 3 or cols is None or cols.size != blocks[0] * blocks[1]:
        return None
    alpha, _, h = blocks
    return Linear(
        node=m.named["linear"], name=node_label(index.graph.node[m.named["linear"]], m.named["linear"]), op="grouped",
        data_input=m["x"], weight=m["blocks"], weight_out_in=True, bias=m.get("b"), add_node=None,
        output=node.output[0], in_features=int(cols.max()) + 1, out_features=alpha * h, read_only=True,
        entry=m.named["entry"], columns=(m["cols"],),
    )


def grouped_fused_linear(index: GraphIndex, i: int, grouped: dict[str, Linear]) -> Linear | None:
    """A Concat (node ``i``) of two grouped linears over one input: a fused gate/up, batched half by half."""
    node = index.graph.node[i]
    parts = [grouped.get(t) for t in node.input]
    if len(parts) != 2 or any(p is None for p in parts) or int(get_attr(node, "axis", 0)) != -1:
        return None
    a, b = parts  # type: ignore[misc]
    if a.data_input != b.data_input or a.in_features != b.in_features:
        return None
    return Linear(
        node=i, name=a.name, op="grouped-fused", data_input=a.data_input, weight=a.weight, weight_out_in=True,
        bias=None, add_node=None, output=node.output[0], in_features=a.in_features,
        out_features=a.out_features + b.out_features, read_only=True, entry=a.entry, parts=(a, b),
    )


def tied_sum_linear(index: GraphIndex, i: int) -> Linear | None:
    """The tied second linear ``ReduceSum over children -> MatMul`` ending at MatMul node ``i``, or None."""
    node = index.graph.node[i]
    users = index.consumers.get(node.output[0], [])
    anchors = [index.graph.node[users[0]].output[0]] if len(users) == 1 else []
    for anchor in anchors + [node.output[0]]:
        m = match(index, TIED_SUM, anchor)
        if m and m.named["linear"] == i:
            break
    else:
        return None
    tail = index.constant_value(m["tail"])
    w = index.constant_shape(m["w"])
    if tail is None or tail.size != 2 or w is None or len(w) != 2 or int(tail[1]) != w[0]:
        return None
    alpha, h = int(tail[0]), int(tail[1])
    add = m.named.get("add")
    return Linear(
        node=i, name=node_label(node, i), op="tied-sum", data_input=m["x"], weight=m["w"], weight_out_in=False,
        bias=m.get("b"), add_node=add, output=index.graph.node[add].output[0] if add is not None else node.output[0],
        in_features=alpha * h, out_features=w[1], read_only=True, entry=m.named["entry"],
    )


def read_stored(index: GraphIndex, lin: Linear) -> tuple[np.ndarray, np.ndarray | None]:
    """The effective ``W`` (out, in) and ``b`` of a read-only stored form, rows in the FPE layout."""
    if lin.op == "grouped":
        blocks = index.constant_value(lin.weight)
        cols = index.constant_value(lin.columns[0])
        if blocks is None or cols is None:
            raise ValueError(f"{lin.name}: the grouped weights are not constants")
        alpha, m, h = blocks.shape
        w = np.zeros((h * alpha, lin.in_features), dtype=blocks.dtype)
        cols = cols.reshape(alpha, m).astype(np.int64)
        for k in range(alpha):
            rows = k * h + np.arange(h)
            np.add.at(w, (rows[:, None], cols[k][None, :]), blocks[k].T)  # padding reads column 0 with weight 0
        raw = None if lin.bias is None else index.constant_value(lin.bias)
        return w, None if raw is None else raw.reshape(-1).copy()
    if lin.op == "grouped-fused":
        parts = [read_stored(index, p) for p in lin.parts]
        bias = None if any(b is None for _, b in parts) else np.concatenate([b for _, b in parts])  # type: ignore[misc]
        return np.vstack([w for w, _ in parts]), bias
    if lin.op == "tied-sum":
        w2 = index.constant_value(lin.weight)
        if w2 is None:
            raise ValueError(f"{lin.name}: the tied weight is not a constant")
        alpha = lin.in_features // w2.shape[0]
        b = None if lin.bias is None else index.constant_value(lin.bias)
        return np.tile(w2.T, (1, alpha)), None if b is None else b.reshape(-1).copy()
    if lin.op == "per-child":
        return _read_children(index, lin)
    if lin.op == "tied-children":
        (second,) = lin.parts
        w2, b2 = read_weights(index, second)
        return np.repeat(w2, lin.in_features // w2.shape[1], axis=1), b2
    raise ValueError(f"{lin.name}: {lin.op} is not a stored form")


def tied_weights(index: GraphIndex, lin: Linear) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The weights a tied second linear stores (each parent's column once), or None for other forms:
    the count of a ``--structured`` block is over stored parameters (``docs/methods.md`` 1.5)."""
    if lin.op == "tied-children":
        return read_weights(index, lin.parts[0])
    if lin.op == "tied-sum":
        w2 = index.constant_value(lin.weight)
        b = None if lin.bias is None else index.constant_value(lin.bias)
        return (None if w2 is None else w2.T.copy()), None if b is None else b.reshape(-1).copy()  # type: ignore[return-value]
    return None


def fpe_rows(index: GraphIndex, lin: Linear) -> np.ndarray | None:
    """For a batched stored form, the row order that gives the FPE layout (``w[order]``); None when the
    rows already are in it."""
    if lin.op == "grouped-fused":
        orders = [fpe_rows(index, p) for p in lin.parts]
        offset = lin.parts[0].out_features
        return np.concatenate([orders[0], orders[1] + offset])  # type: ignore[operator]
    if lin.op not in ("grouped", "tied-sum"):
        return None
    shape = index.constant_shape(lin.weight)
    alpha = shape[0] if lin.op == "grouped" and shape else lin.in_features // (shape[0] if shape else 1)
    h = (lin.out_features if lin.op == "grouped" else lin.in_features) // alpha
    return (np.arange(alpha)[None, :] * h + np.arange(h)[:, None]).ravel()  # FPE unit i*alpha+k sits at k*h+i


def _read_children(index: GraphIndex, lin: Linear) -> tuple[np.ndarray, np.ndarray | None]:
    alpha = len(lin.parts)
    child = [read_weights(index, p) for p in lin.parts]
    h = child[0][0].shape[0]
    w = np.zeros((h * alpha, lin.in_features), dtype=child[0][0].dtype)
    b = None if child[0][1] is None else np.zeros(h * alpha, dtype=child[0][1].dtype)
    for k, ((wk, bk), cols_name) in enumerate(zip(child, lin.columns)):
        cols = _columns(index, cols_name, lin, k)
        w[np.arange(h)[:, None] * alpha + k, cols[None, :]] = wk
        if b is not None and bk is not None:
            b[np.arange(h) * alpha + k] = bk
    return w, b


def _columns(index: GraphIndex, name: str, lin: Linear, k: int) -> np.ndarray:
    """The input columns child ``k`` reads: a Gather's indices, or the ``k``-th piece of a Split."""
    value = index.constant_value(name)
    if value is not None:
        return value.reshape(-1).astype(np.int64)
    sizes = [p.in_features for p in lin.parts]
    start = int(np.sum(sizes[:k]))
    return np.arange(start, start + sizes[k])


def per_child_blocks(
    index: GraphIndex, linears: dict[int, Linear],
) -> list[tuple[Linear, Linear | None, Linear, tuple[str, str, list[int]], list[int]]]:
    """The lone tied blocks written one MatMul per child: ``(first, up, second, child 0's activation, nodes)``
    with composite read-only linears (see the module docstring)."""
    by_output = {lin.output: lin for lin in linears.values()}
    by_input: dict[str, list[Linear]] = {}
    for lin in linears.values():
        by_input.setdefault(lin.data_input, []).append(lin)
    found = []
    for s, node in enumerate(index.graph.node):
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(node.input) < 1:
            continue
        seconds = [lin for lin in by_input.get(node.output[0], []) if lin.node == index.consumers[node.output[0]][0]]
        if len(seconds) != 1 or index.consumer_count(node.output[0]) != 1:
            continue
        children = [_child(index, t, by_output) for t in node.input]
        if any(c is None for c in children):
            continue
        xs = {_split_source(index, c[0].data_input) for c in children}  # type: ignore[index]
        if len(xs) != 1 or None in xs:
            continue
        x = xs.pop()
        gates = tuple(c[0] for c in children)  # type: ignore[index]
        ups = tuple(c[1] for c in children)  # type: ignore[index]
        cols = tuple(_column_tensor(index, g.data_input) for g in gates)
        d = sum(g.in_features for g in gates)
        h = gates[0].out_features
        first = Linear(node=s, name=gates[0].name, op="per-child", data_input=x, weight=gates[0].weight, weight_out_in=True,
                       bias=gates[0].bias, add_node=None, output=gates[0].output, in_features=d,
                       out_features=h * len(gates), read_only=True, parts=gates, columns=cols)
        up = None
        if all(u is not None for u in ups):
            up = Linear(node=s, name=ups[0].name, op="per-child", data_input=x, weight=ups[0].weight,  # type: ignore[union-attr]
                        weight_out_in=True, bias=ups[0].bias, add_node=None, output=ups[0].output,  # type: ignore[union-attr]
                        in_features=d, out_features=h * len(ups), read_only=True, parts=ups, columns=cols)  # type: ignore[arg-type]
        second = seconds[0]
        tied = Linear(node=second.node, name=second.name, op="tied-children", data_input=node.output[0],
                      weight=second.weight, weight_out_in=True, bias=second.bias, add_node=second.add_node,
                      output=second.output, in_features=h * len(gates), out_features=second.out_features, read_only=True,
                      parts=(second,))
        nodes = sorted({i for c in children for i in c[2]} | {s})  # type: ignore[index]
        found.append((first, up, tied, _child_activation(index, node.input[0], children[0]), nodes))  # type: ignore[arg-type]
    return found


def _child_activation(index: GraphIndex, out: str, child: tuple[Linear, Linear | None, list[int], str]) -> tuple[str, str, list[int]]:
    """Child 0's activation: ``(start, end, nodes)`` without the gated product."""
    gate, up, nodes, start = child
    if up is None:
        return start, out, nodes
    product = index.producer[out]
    end = next((t for t in index.graph.node[product].input if t != up.output), out)
    return start, end, [i for i in nodes if i != product]


def _child(index: GraphIndex, t: str, by_output: dict[str, Linear]) -> tuple[Linear, Linear | None, list[int], str] | None:
    """Trace a child's activation copy back to its linear(s): ``(gate, up, nodes, gate output)``."""
    nodes, reached, frontier, seen = [], [], [t], {t}
    while frontier:
        name = frontier.pop()
        if name in by_output:
            reached.append(by_output[name])
            continue
        i = index.producer.get(name)
        if i is None or not is_elementwise(index.graph.node[i]) or len(nodes) > 32:
            return None
        nodes.append(i)
        for inp in index.graph.node[i].input:
            if inp and inp not in seen and index.constant_source(inp) is None:
                seen.add(inp)
                frontier.append(inp)
    reached = sorted({lin.node: lin for lin in reached}.values(), key=lambda lin: lin.node)
    if len(reached) == 1:
        return reached[0], None, nodes, reached[0].output
    if len(reached) != 2:
        return None
    last = index.producer.get(t)
    direct = [lin for lin in reached if set(index.consumers.get(lin.output, [])) <= {last}]
    up = direct[0] if len(direct) == 1 else reached[1]
    gate = reached[0] if up is reached[1] else reached[1]
    return gate, up, nodes, gate.output


def _split_source(index: GraphIndex, x_k: str) -> str | None:
    i = index.producer.get(x_k)
    node = None if i is None else index.graph.node[i]
    if node is None or node.op_type not in ("Split", "Gather"):
        return None
    if node.op_type == "Gather" and int(get_attr(node, "axis", 0)) != -1:
        return None
    return node.input[0]


def _column_tensor(index: GraphIndex, x_k: str) -> str:
    node = index.graph.node[index.producer[x_k]]
    return node.input[1] if node.op_type == "Gather" else ""
