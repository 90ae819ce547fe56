"""Declared patterns: how a tensor is computed, matched backwards from it, with a reason when it is not.

Block detection reads as declarations where the shape of a graph is fixed (a linear form, an
activation decomposition, a gated product, a fused gate/up split): a pattern names the ops that
compute a tensor and the variables its inputs bind to, for example::

    MATMUL_ADD = Op("Add", Op("MatMul", Var("x"), Var("w"), name="linear"), Var("b"), name="add", commutative=True)

:func:`match` walks the pattern from a tensor back to the graph's inputs: an :class:`Op` matches the
node that produces the tensor (op type, domain, attributes, inputs in order, or in either order when
``commutative``), a :class:`Var` matches any tensor and binds it (the same name must bind the same
tensor everywhere), a :class:`Const` matches a constant (optionally a scalar close to a value).
:class:`AnyOf` tries alternatives, each from a clean state; :class:`Maybe` also matches an absent input.
An inner node of a pattern must feed nothing but the pattern (``private``), so a match is a closed
piece of graph that a rewrite may change.

The result is a :class:`Match`: bindings (variable -> tensor), named nodes (name -> node index) and
the indices of every matched node, or a failed match carrying a :class:`Reason`. The checks that
follow a structural match (is the weight a constant? is the bias shared?) return reasons the same
way (:meth:`Match.fail`), and the reasons end up in the skipped list the user sees. The region walk
between two linears is not a pattern (its length is not fixed); it stays imperative
(:mod:`neurorewrite.rewriter.region`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label

DEFAULT_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Reason:
    """Why a pattern or a check did not match: a short code tests and tools can rely on, and the
    one-line message the user reads."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Match:
    """The outcome of :func:`match`: what the pattern's variables and named nodes bound to, or why not."""

    bindings: dict[str, str] = field(default_factory=dict)
    named: dict[str, int] = field(default_factory=dict)
    nodes: list[int] = field(default_factory=list)
    reason: Reason | None = None

    def __bool__(self) -> bool:
        return self.reason is None

    def __getitem__(self, var: str) -> str:
        return self.bindings[var]

    def get(self, var: str) -> str | None:
        return self.bindings.get(var)

    def fail(self, code: str, message: str) -> Match:
        """Mark the match failed with a reason; returns itself so a check can ``return m.fail(...)``."""
        self.reason = Reason(code, message)
        return self

    def copy(self) -> Match:
        return Match(dict(self.bindings), dict(self.named), list(self.nodes), self.reason)


class Pattern:
    """How a tensor is computed. Subclasses implement :meth:`step`."""

    def step(self, index: GraphIndex, tensor: str, m: Match, inner: bool) -> Match:
        """Match ``tensor`` against this pattern, extending ``m`` (a fresh copy on success or failure)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pattern):
    """Any tensor; bound to ``name`` (a second use of the name must be the same tensor).
    ``check(index, tensor)`` may refuse it with a message."""

    name: str | None = None
    check: Callable[[GraphIndex, str], str | None] | None = None

    def step(self, index: GraphIndex, tensor: str, m: Match, inner: bool) -> Match:
        m = m.copy()
        if self.name is not None:
            bound = m.bindings.get(self.name)
            if bound is not None and bound != tensor:
                return m.fail("pattern", f"{tensor} is not {bound}")
            m.bindings[self.name] = tensor
        if self.check is not None:
            why = self.check(index, tensor)
            if why:
                return m.fail("pattern", why)
        return m


@dataclass(frozen=True)
class Const(Pattern):
    """A constant tensor (initializer, Constant node, or an Identity of one; not a graph input).

    ``scalar``: every dimension is 1. ``value``: every element is within ``tol`` (relative) of it.
    """

    name: str | None = None
    value: float | None = None
    scalar: bool = False
    tol: float = 1e-3

    def step(self, index: GraphIndex, tensor: str, m: Match, inner: bool) -> Match:
        m = Var(self.name).step(index, tensor, m, inner)
        if not m:
            return m
        if index.constant_source(tensor) not in ("initializer", "constant"):
            return m.fail("pattern", f"{tensor} is not a constant")
        shape = index.constant_shape(tensor)
        if (self.scalar or self.value is not None) and (shape is None or any(d != 1 for d in shape)):
            return m.fail("pattern", f"{tensor} is not a scalar constant")
        if self.value is not None:
            value = index.constant_value(tensor)
            if value is None or not np.allclose(value.astype(np.float64), self.value, rtol=self.tol, atol=0.0):
                return m.fail("pattern", f"{tensor} is not {self.value}")
        return m


@dataclass(frozen=True)
class Maybe(Pattern):
    """An optional input: absent (or empty), or matching ``pattern``."""

    pattern: Pattern

    def step(self, index: GraphIndex, tensor: str, m: Match, inner: bool) -> Match:
        return m.copy() if not tensor else self.pattern.step(index, tensor, m, inner)


@dataclass(frozen=True)
class AnyOf(Pattern):
    """The first of ``alternatives`` that matches (each tried from the same state)."""

    alternatives: tuple[Pattern, ...]

    def step(self, index: GraphIndex, tensor: str, m: Match, inner: bool) -> Match:
        last = m.copy().fail("pattern", "no alternative")
        for alt in self.alternatives:
            last = alt.step(index, tensor, m, inner)
            if last:
                return last
        return last


def any_of(*alternatives: Pattern) -> AnyOf:
    return AnyOf(tuple(alternatives))


AttrCheck = Callable[[object], bool]


class Op(Pattern):
    """The node that produces the tensor: ``op`` (one name or several), in ``domain``, output ``output``.

    ``inputs`` are matched in order; ``None`` stands for an absent input; more inputs on the node than
    in the pattern fail unless ``extra_inputs``. ``commutative`` (two inputs) also tries them swapped.
    ``attrs`` maps an attribute name to its required value or to a predicate of it (the default value
    counts when the attribute is missing, via ``defaults``). ``name`` binds the node's index.
    ``private``: as an inner node, its outputs feed only the pattern.
    """

    def __init__(
        self, op: str | Sequence[str], *inputs: Pattern | None, name: str | None = None,
        domain: str | Sequence[str] = DEFAULT_DOMAINS, commutative: bool = False, output: int = 0,
        attrs: dict[str, object] | None = None, defaults: dict[str, object] | None = None,
        extra_inputs: bool = False, private: bool = True,
    ) -> None:
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.inputs = inputs
        self.name = name
        self.domains = (domain,) if isinstance(domain, str) else tuple(domain)
        self.commutative = commutative
        self.output = output
        self.attrs = attrs or {}
        self.defaults = defaults or {}
        self.extra_inputs = extra_inputs
        self.private = private

    def __repr__(self) -> str:
        return f"Op({'|'.join(self.ops)})"

    def step(self, index: GraphIndex, tensor: str, m: Match, inner: bool) -> Match:
        m = m.copy()
        i = index.producer.get(tensor)
        if i is None:
            return m.fail("pattern", f"{tensor} is not computed by {'/'.join(self.ops)}")
        node = index.graph.node[i]
        label = node_label(node, i)
        domain = "" if node.domain == "ai.onnx" else node.domain
        if node.op_type not in self.ops or domain not in self.domains:
            return m.fail("pattern", f"{tensor} comes from {node.op_type} node {label}, not {'/'.join(self.ops)}")
        if list(node.output).index(tensor) != self.output:
            return m.fail("pattern", f"{tensor} is output {list(node.output).index(tensor)} of {label}")
        if inner and self.private:
            users = [o for o in node.output if o and (index.consumer_count(o) > 1 or o in index.graph_outputs)]
            if users:
                return m.fail("pattern", f"{users[0]} (from {label}) is used outside the pattern")
        for attr, want in self.attrs.items():
            have = get_attr(node, attr, self.defaults.get(attr))
            ok = want(have) if callable(want) else have == want
            if not ok:
                return m.fail("pattern", f"{node.op_type} node {label} has {attr}={have!r}")
        if self.name is not None:
            if self.name in m.named and m.named[self.name] != i:
                return m.fail("pattern", f"{label} is not the node bound to {self.name}")
            m.named[self.name] = i
        if i not in m.nodes:
            m.nodes.append(i)
        actual = list(node.input)
        if len(actual) > len(self.inputs) and not self.extra_inputs and any(actual[len(self.inputs):]):
            return m.fail("pattern", f"{node.op_type} node {label} has {len(actual)} inputs")
        orders = [list(self.inputs)]
        if self.commutative and len(self.inputs) == 2:
            orders.append(list(reversed(self.inputs)))
        last = m
        for order in orders:
            last = _match_inputs(index, actual, order, m, label)
            if last:
                return last
        return last


def _match_inputs(index: GraphIndex, actual: list[str], patterns: list[Pattern | None], m: Match, label: str) -> Match:
    for slot, p in enumerate(patterns):
        tensor = actual[slot] if slot < len(actual) else ""
        if p is None:
            if tensor:
                return m.copy().fail("pattern", f"input {slot} of {label} is not expected")
            continue
        if not tensor and not isinstance(p, Maybe):
            return m.copy().fail("pattern", f"input {slot} of {label} is missing")
        m = p.step(index, tensor, m, True)
        if not m:
            return m
    return m


def match(index: GraphIndex, pattern: Pattern, tensor: str) -> Match:
    """Match ``pattern`` against the computation of ``tensor``; the root node may feed anything."""
    return pattern.step(index, tensor, Match(), False)


def first_match(index: GraphIndex, patterns: Sequence[tuple[str, Pattern]], tensor: str) -> tuple[str, Match]:
    """The first of the named ``patterns`` that matches ``tensor``: ``(name, match)``, or ``("", failed)``."""
    last = Match().fail("pattern", f"{tensor}: no pattern matches")
    for name, p in patterns:
        last = match(index, p, tensor)
        if last:
            return name, last
    return "", last
