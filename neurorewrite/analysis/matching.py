"""Pair the MLP blocks of an original model with those of its rewritten version.

Three rules, tried in order on the blocks still unpaired:

1. FPE metadata: the rewritten model's ``neurorewrite.fpe`` record lists each expanded block with the
   node names of its linears and its width before and after; the names must exist in both models and
   the widths must agree with the record.
2. Node names: blocks whose first linear has the same node name (the expand pass keeps node names).
3. Graph order: when both models have the same number of blocks left, they pair in graph order.

Every pair must keep the block's input and output features; the hidden width may grow. Whatever stays
unpaired is a :class:`Mismatch` with the reason, so a user sees why two blocks were not compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.record import FPERecord


@dataclass(frozen=True)
class BlockPair:
    before: str  # block name in the first model
    after: str  # block name in the second model
    how: str  # "FPE metadata", "node names" or "graph order"
    alpha: int | None  # hidden width after / before, when a whole number


@dataclass(frozen=True)
class Mismatch:
    model: str  # "first" or "second"
    block: str
    reason: str


@dataclass
class Matching:
    pairs: list[BlockPair] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _shape_problem(a: MLPBlock, b: MLPBlock) -> str | None:
    if (a.in_features, a.out_features) != (b.in_features, b.out_features):
        return (f"block {a.name} of the first model maps {a.in_features} -> {a.out_features} features, block "
                f"{b.name} of the second maps {b.in_features} -> {b.out_features}")
    if b.width < a.width:
        return (f"hidden width shrinks from {a.width} (first model, {a.name}) to {b.width} (second, {b.name}); "
                "pass the original model first")
    return None


def _pair(a: MLPBlock, b: MLPBlock, how: str) -> BlockPair:
    return BlockPair(a.name, b.name, how, b.width // a.width if b.width % a.width == 0 else None)


def _by_metadata(first: dict[str, MLPBlock], second: dict[str, MLPBlock], meta: FPERecord, out: Matching) -> None:
    for record in meta.blocks:
        key = record.first
        a, b = first.get(key), second.get(key)
        if b is None:
            continue  # the record names a block this model no longer has: rules 2 and 3 will tell
        if a is None:
            out.mismatches.append(Mismatch("second", b.name, f"its FPE record names linear {key}, which the first "
                                           "model does not have: is the first model the one that was expanded?"))
            del second[key]
            continue
        widths = (record.width_before, record.width_after)
        problem = _shape_problem(a, b)
        if problem is None and widths != (a.width, b.width):
            problem = (f"the FPE record says {key} went {widths[0]} -> {widths[1]} hidden units, but the models "
                       f"have {a.width} and {b.width}: the first model is not the one that was expanded")
        if problem is not None:
            out.mismatches.append(Mismatch("second", b.name, problem))
        else:
            out.pairs.append(_pair(a, b, "FPE metadata"))
        del first[key], second[key]


def match_blocks(
    first: list[MLPBlock], second: list[MLPBlock], meta_first: FPERecord | None, meta_second: FPERecord | None
) -> Matching:
    """Pair ``first``'s blocks with ``second``'s (see the module docstring)."""
    out = Matching()
    if meta_first and not meta_second:
        out.notes.append("the first model carries an FPE record and the second does not: "
                         "give the original model first and the rewritten one second")
    left = {b.first.name: b for b in first}
    right = {b.first.name: b for b in second}
    if meta_second:
        _by_metadata(left, right, meta_second, out)
    why: dict[str, str] = {}  # first-model block -> why its same-named counterpart did not pair
    for key in [k for k in left if k in right]:
        problem = _shape_problem(left[key], right[key])
        if problem is None:
            out.pairs.append(_pair(left.pop(key), right.pop(key), "node names"))
        else:
            why[key] = problem
    if left and len(left) == len(right):
        for a, b in zip(list(left.values()), list(right.values())):
            if _shape_problem(a, b) is None:
                out.pairs.append(_pair(a, b, "graph order"))
                del left[a.first.name], right[b.first.name]
    names = ", ".join(sorted(b.name for b in right.values())) or "none"
    for key, a in left.items():
        reason = why.get(key) or (f"no block of the second model matches it by FPE record, node name or "
                                  f"graph order and shape (unpaired there: {names})")
        out.mismatches.append(Mismatch("first", a.name, reason))
    names = ", ".join(sorted(b.name for b in left.values())) or "none"
    for key, b in right.items():
        reason = why.get(key) or f"no block of the first model matches it (unpaired there: {names})"
        out.mismatches.append(Mismatch("second", b.name, reason))
    order = {b.name: i for i, b in enumerate(first)}
    out.pairs.sort(key=lambda p: order[p.before])
    return out
