"""MLP blocks of a torch module, found on its data flow: pattern, check, and a reason for every miss.

Three patterns, matched on the :class:`~neurorewrite.models.trace_ops.OpGraph` of the module's forward:

- **plain** ``second(act(first(x)))``: the output of a linear-like module reaches exactly one other
  linear-like module through a region of elementwise ops whose other operands are scalar constants
  (``act`` may be a module, a function or a composition such as GPT-2's ``gelu_new``; no op at all is
  the identity);
- **gated** ``down(act(gate(x)) * up(x))``: inside that region one ``mul`` takes, as its other
  operand, the output of a second linear ``up`` that reads the same tensor ``x`` as ``gate``. After the
  product only inference identities (dropout, casts) may follow; ``up``'s output feeds nothing else;
- **fused gated** (Phi-3): one linear's output cut by ``chunk(2, dim=-1)``, one half through the
  activation, the product with the other half, ``down``. ``chunk(2)`` halves any width, so the
  forward stays right once the fused linear is widened; a cut by a fixed size is a near miss.

The checks that follow a match, each a :class:`SkippedModule` reason when it fails: both linears
called once per forward, or every call of them inside the same block (ALBERT runs one layer several
times: widening the block's modules widens every call alike; a module called elsewhere too cannot be
widened for one call only), weights not
shared with another module, widths that agree, the hidden value not an output of the forward, and no
other user of it (a norm, a reshape, a second linear). Like the ONNX detector
(:mod:`neurorewrite.rewriter.blocks`), a chain whose region never looked like an activation (an
attention projection that goes on into a reshape) is not reported at all.

Blocks come in execution order of their first (gate) linear, the order of the linears in the exported
ONNX graph, so block ``k`` gets the same seed on both sides.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from neurorewrite.models.trace_ops import Op, OpGraph, is_conv1d

LABELS = {
    "relu": "ReLU", "relu6": "ReLU6", "leaky_relu": "LeakyReLU", "elu": "ELU", "selu": "SELU", "celu": "CELU",
    "gelu": "GELU", "silu": "SiLU", "mish": "Mish", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus",
    "softsign": "Softsign", "hardtanh": "Hardtanh", "hardsigmoid": "Hardsigmoid", "hardswish": "Hardswish",
    "tanhshrink": "Tanhshrink", "logsigmoid": "LogSigmoid", "log_sigmoid": "LogSigmoid",
}


@dataclass(frozen=True)
class ModuleBlock:
    """One block by module paths: ``second(act(first(x)))``, gated ``second(act(first(x)) * up(x))``, or
    gated with gate and up fused in ``first`` (``g, u = first(x).chunk(2, -1)``)."""

    first: str
    second: str
    activation: str
    up: str | None = None
    gate_half: int | None = None  # a fused gate/up ``first`` cut by chunk(2): which half is the gate

    @property
    def gated(self) -> bool:
        return self.up is not None or self.gate_half is not None

    @property
    def form(self) -> str:
        """As the ONNX record names it: ``mlp``, ``gated``, ``gated (fused gate/up)``."""
        return "gated (fused gate/up)" if self.gate_half is not None else "gated" if self.up is not None else "mlp"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The linears that produce the hidden layer: ``(first,)`` or ``(gate, up)``."""
        return (self.first,) if self.up is None else (self.first, self.up)


@dataclass(frozen=True)
class SkippedModule:
    """A chain that looks like an MLP block but is not expanded, and why (``name``: its first linear)."""

    name: str
    reason: str


@dataclass
class ModuleSearch:
    tracer: str
    blocks: list[ModuleBlock] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)


@dataclass
class _Region:
    ops: list[int] = field(default_factory=list)  # elementwise ops after the first linear, in walk order
    exits: list[tuple[int, int]] = field(default_factory=list)  # (value op, linear op reading it)
    reason: str | None = None
    looked_like: bool = False  # an activation op or another linear was reached


SPLITS = frozenset({"chunk", "split", "split_with_sizes", "unbind", "getitem", "slice", "narrow", "tensor_split"})


def _walk(graph: OpGraph, start: int, through_splits: bool = False) -> _Region:
    """Follow the elementwise users of ``start``'s value until they reach linear ops (with
    ``through_splits``, also through ops that cut the value into pieces)."""
    region, frontier, seen = _Region(), [start], {start}
    while frontier and region.reason is None:
        value = frontier.pop()
        if value in graph.outputs:
            region.reason = f"the value of {graph.ops[value].label} is also an output of the forward"
            break
        for user in graph.users.get(value, []):
            op = graph.ops[user]
            if op.kind == "linear":
                region.exits.append((value, user))
                region.looked_like = True
            elif op.kind in ("unary", "binary", "pass") or (through_splits and op.name in SPLITS):
                region.looked_like |= op.kind == "unary"
                if user not in seen:
                    seen.add(user)
                    region.ops.append(user)
                    frontier.append(user)
            elif op.kind != "ignore":
                region.reason = f"the hidden value reaches {op.label}, which is not elementwise"
                break
    return region


def _source(graph: OpGraph, index: int) -> Op:
    """The op behind ``index`` once inference identities (dropout, casts) are looked through."""
    op = graph.ops[index]
    while op.kind == "pass" and op.args and op.args[0] is not None:
        op = graph.ops[op.args[0]]
    return op


def _label(ops: list[Op]) -> str:
    acts = [op for op in ops if op.kind != "pass"]
    if not acts:
        return "Identity"
    names = Counter(op.name for op in acts)
    if len(acts) == 1:
        op = acts[0]
        base = LABELS.get(op.name, op.name)
        return f"{base}(tanh)" if op.name == "gelu" and op.detail == "tanh" else base
    if set(names) == {"sigmoid", "mul"} and names["sigmoid"] == 1:
        return "SiLU"
    if "erf" in names and set(names) <= {"div", "mul", "erf", "add"}:
        return "GELU(erf)"
    if "tanh" in names and set(names) <= {"mul", "add", "tanh", "pow"}:
        return "GELU(tanh)"
    return "elementwise(" + ",".join(sorted(names)) + ")"


def _match(graph: OpGraph, first: Op) -> tuple[ModuleBlock | None, str | None, bool]:
    """The block starting at linear ``first``, or why there is none, and whether to report it."""
    region = _walk(graph, first.index)
    if region.reason is None and region.exits:
        return (*_finish(graph, first, first.index, region, None), True)
    cut = _cut(graph, first)
    if cut is None:
        return None, region.reason, region.looked_like
    if isinstance(cut, str):
        return None, cut, True
    reasons = []
    for gate_half in (0, 1):  # the half that goes through the activation is the gate
        region = _walk(graph, cut[gate_half])
        if region.reason is None and region.exits:
            block, reason = _finish(graph, first, cut[gate_half], region, cut[1 - gate_half])
            if block is not None:
                return ModuleBlock(block.first, block.second, block.activation, gate_half=gate_half), None, True
            reasons.append(reason)
    return None, reasons[0] if reasons else f"the halves of {first.label} do not meet in a gated product", True


def _finish(
    graph: OpGraph, first: Op, start: int, region: _Region, partner: int | None
) -> tuple[ModuleBlock | None, str | None]:
    """Check a walked region that reached a linear: a plain block, or a gated one whose product takes
    a linear reading the same input (``partner``: the up half of a fused projection instead)."""
    inside = {start, *region.ops}
    foreign: list[tuple[Op, int]] = []  # (op, operand) pairs that mix in a tensor from outside
    for i in region.ops:
        op = graph.ops[i]
        operands = op.args if op.kind == "binary" else op.args[1:] if op.kind == "unary" else ()
        foreign += [(op, a) for a in operands if a is not None and a not in inside]
    product: Op | None = None
    if foreign:
        op, operand = foreign[0]
        up = _source(graph, operand)
        wanted = up.index == partner if partner is not None else up.kind == "linear"
        if len(foreign) > 1 or op.name != "mul" or not wanted:
            return None, f"{op.label} mixes in {up.label}, which is not a scalar constant"
        if partner is None and up.args[:1] != first.args[:1]:
            return None, f"{op.label} multiplies by {up.label}, which reads another input than {first.label}"
        product = op
        reason = _check_gated(graph, region, product, operand, up)
        if reason is not None:
            return None, reason
    elif partner is not None:
        return None, f"the halves of {first.label} do not meet in a gated product"
    if len({value for value, _ in region.exits}) > 1 or len(region.exits) > 1:
        return None, "the hidden value feeds several linear layers"
    value, second_index = region.exits[0]
    if product is not None and not _downstream(graph, product.index, value):
        return None, f"the hidden value reaches {graph.ops[second_index].label} before {product.label}"
    gate_side = [graph.ops[i] for i in region.ops if product is None or not _downstream(graph, product.index, i)]
    up_name = _source(graph, operand).name if product is not None and partner is None else None
    return ModuleBlock(first.name, graph.ops[second_index].name, _label(gate_side), up_name), None


def _cut(graph: OpGraph, first: Op) -> tuple[int, int] | str | None:
    """The two halves of a fused gate/up projection cut by ``chunk(2, dim=-1)`` (Phi-3's
    ``gate_up_proj``), as the getitem ops that take them; a reason when the output is cut some other
    way but goes on through an activation into a linear; None when it is not cut at all."""
    users = [graph.ops[u] for u in graph.users.get(first.index, []) if graph.ops[u].kind != "ignore"]
    cuts = [op for op in users if op.name in SPLITS]
    if not cuts:
        return None
    region = _walk(graph, first.index, through_splits=True)
    if region.reason is not None or not region.exits or not region.looked_like:
        return None  # e.g. an attention projection cut into heads: not an FFN
    cut = cuts[0]
    dim = cut.options.get("dim", cut.params[2] if len(cut.params) > 2 else 0)
    last = dim == -1 or (cut.rank is not None and dim == cut.rank - 1)
    if len(users) > 1 or cut.name != "chunk" or cut.params[1:2] != (2,) or not last:
        return (
            f"the output of {first.label} is cut by {cut.label} before the activation; fpe_expand widens a fused "
            "gate/up projection only when its forward cuts it with chunk(2, dim=-1), which halves any width"
        )
    takers = graph.users.get(cut.index, [])
    halves = {graph.ops[u].params[1]: u for u in takers if graph.ops[u].name == "getitem"}
    if sorted(halves) != [0, 1] or len(takers) != 2:
        return f"the halves of {first.label} ({cut.label}) are not taken once each"
    return halves[0], halves[1]


def _check_gated(graph: OpGraph, region: _Region, product: Op, operand: int, up: Op) -> str | None:
    after = [graph.ops[i] for i in region.ops if i != product.index and _downstream(graph, product.index, i)]
    if any(op.kind != "pass" for op in after):
        bad = next(op for op in after if op.kind != "pass")
        return f"{bad.label} follows the gate product {product.label}: not the gated form act(gate) * up"
    chain = [operand]  # up's value and the identities between it and the product: used by nothing else
    while chain[-1] != up.index:
        chain.append(graph.ops[chain[-1]].args[0])  # type: ignore[arg-type]
    for value in chain:
        users = [u for u in graph.users.get(value, []) if graph.ops[u].kind != "ignore"]
        if value in graph.outputs or len(users) != 1:
            return f"the value of {up.label} is used by more than the gate product {product.label}"
    return None


def _downstream(graph: OpGraph, start: int, target: int) -> bool:
    """Whether ``target`` is ``start`` or computed from it (ops are in execution order)."""
    if target == start:
        return True
    reach, frontier = {start}, [start]
    while frontier:
        for user in graph.users.get(frontier.pop(), []):
            if user <= target and user not in reach:
                if user == target:
                    return True
                reach.add(user)
                frontier.append(user)
    return False


def _widths(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def _calls_outside(graph: OpGraph, block: ModuleBlock) -> str | None:
    """A module of ``block`` called other than as part of ``block`` (every call of its first linear
    matches the same block, and each of its modules is called that many times), or None."""
    calls = [op for op in graph.linears() if op.name == block.first]
    for path in (*block.inputs, block.second):
        if graph.calls[path] != len(calls):
            return path
    if len(calls) > 1 and any(_match(graph, op)[0] != block for op in calls):
        return block.first
    return None


def _check(model: nn.Module, graph: OpGraph, block: ModuleBlock, owners: dict[int, list[str]]) -> str | None:
    outside = _calls_outside(graph, block)
    if outside is not None:
        return (f"{outside} is called {graph.calls[outside]} times in one forward, not each time in this block; widening"
                " it would change every call")
    for path in (*block.inputs, block.second):
        for param in model.get_submodule(path).parameters(recurse=False):
            others = [p for p in owners.get(id(param), []) if p != path]
            if others:
                return f"a parameter of {path} is shared with {others[0]}"
    d_in, width = _widths(model.get_submodule(block.first))
    if block.gate_half is not None:
        if width % 2:
            return f"{block.first} has an odd number of outputs ({width}) but its forward cuts them in two halves"
        width //= 2
    if block.up is not None and _widths(model.get_submodule(block.up)) != (d_in, width):
        return f"{block.up} has shape {_widths(model.get_submodule(block.up))} but the gate {block.first} {(d_in, width)}"
    reads = _widths(model.get_submodule(block.second))[0]
    if reads != width:
        return f"{block.first} has {width} outputs but {block.second} reads {reads}"
    return None


def find_module_blocks(model: nn.Module, graph: OpGraph) -> ModuleSearch:
    """Every MLP block of ``model`` in execution order of its first linear, and the near misses."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(path)
    search = ModuleSearch(graph.tracer)
    candidates: list[tuple[int, str, str]] = []  # (position, first, reason)
    used: set[str] = set()
    for op in graph.linears():
        if op.name in used:
            continue
        block, reason, report = _match(graph, op)
        if block is not None:
            reason = _check(model, graph, block, owners)
        if reason is None and block is not None:
            search.blocks.append(block)
            used |= set(block.inputs)
        elif reason is not None and report:
            candidates.append((op.index, op.name, reason))
    # a linear found later as the up of a gated block was a near miss only from its own side
    search.skipped = [SkippedModule(name, reason) for _, name, reason in candidates if name not in used]
    return search
