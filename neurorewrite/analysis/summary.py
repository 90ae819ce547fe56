"""An Analysis as a JSON-able summary, and that summary as terminal tables.

The tables are rendered from the summary, so ``--json`` and the tables always tell the same numbers.
Per-neuron and per-feature arrays are summarised (sum, median, 90th percentile); the arrays themselves
stay in the :class:`Analysis` for the Python API and the HTML report.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from neurorewrite.analysis.result import Analysis, BlockAnalysis, ModelAnalysis
from neurorewrite.table import format_table

SHIFTED = ("width", "nonzeros", "capacity_sum", "mean_abs_cosine", "dead_percent", "always_on_percent",
           "phi_max_median", "phi_max_p90")


def block_nonzeros(b: BlockAnalysis) -> int:
    """The block's count under the expand pass's rule: weights and biases of both layers."""
    up = 0 if b.up is None else b.up.nonzeros + b.up.bias_nonzeros
    return b.first.nonzeros + b.first.bias_nonzeros + up + b.second.nonzeros + b.second.bias_nonzeros


def block_summary(b: BlockAnalysis) -> dict[str, object]:
    out: dict[str, object] = {
        "block": b.name, "form": b.form, "activation": b.activation, "in_features": b.in_features, "width": b.width,
        "out_features": b.out_features, "first": asdict(b.first), "up": None if b.up is None else asdict(b.up),
        "second": asdict(b.second),
        "nonzeros": block_nonzeros(b), "capacity_sum": b.capacity_sum,
        "capacity_median": float(np.median(b.capacity)), "unused_features": int(np.count_nonzero(b.capacity == 0)),
        "mean_abs_cosine": b.cosine.mean_abs, "mean_signed_cosine": b.cosine.mean_signed,
        "cosine_rows": b.cosine.rows_used, "activations": None,
    }
    act = b.activations
    if act is not None:
        out["activations"] = {
            "vectors": act.vectors, "dead": int(act.dead.sum()), "always_on": int(act.always_on.sum()),
            "dead_percent": 100.0 * act.dead_fraction, "always_on_percent": 100.0 * act.always_on_fraction,
            "phi_max_median": float(np.median(act.phi_max)), "phi_max_p90": float(np.percentile(act.phi_max, 90)),
            "phi_max_max": float(act.phi_max.max()),
        }
    return out


def model_summary(m: ModelAnalysis) -> dict[str, object]:
    return {
        "model": m.label, "data_vectors": m.data_vectors, "fpe": None if m.fpe is None else m.fpe.to_json(),
        "blocks": [block_summary(b) for b in m.blocks],
        "skipped": [{"block": s.name, "reason": s.reason, "code": s.code} for s in m.skipped],
    }


def _flat(block: dict[str, object]) -> dict[str, object]:
    acts = block.get("activations") or {}
    return {**block, **acts}  # type: ignore[dict-item]


def summarize(analysis: Analysis) -> dict[str, object]:
    """The JSON document of ``neurorewrite analyze --json``."""
    models = [model_summary(analysis.model)] + ([model_summary(analysis.other)] if analysis.other else [])
    out: dict[str, object] = {"models": models}
    if analysis.matching is not None:
        first = {b["block"]: _flat(b) for b in models[0]["blocks"]}  # type: ignore[index,union-attr]
        second = {b["block"]: _flat(b) for b in models[1]["blocks"]}  # type: ignore[index,union-attr]
        pairs = []
        for p in analysis.matching.pairs:
            a, b = first[p.before], second[p.after]
            shift = {k: [a.get(k), b.get(k)] for k in SHIFTED}
            pairs.append({"before": p.before, "after": p.after, "matched_by": p.how, "alpha": p.alpha, **shift})
        out["pairs"] = pairs
        out["mismatches"] = [asdict(m) for m in analysis.matching.mismatches]
        out["notes"] = list(analysis.matching.notes)
    return out


def fmt(value: object) -> str:
    """A number as the tables show it: floats to 4 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: object) -> object:
    return "n/a" if value is None else value  # format_table prints numbers as fmt() does


LABELS = {"width": "hidden", "nonzeros": "block nonzeros", "capacity_sum": "capacity sum",
          "mean_abs_cosine": "mean |cos|", "dead_percent": "dead %", "always_on_percent": "always-on %",
          "phi_max_median": "phi_max median", "phi_max_p90": "phi_max p90"}


Table = tuple[str, list[str], list[list[object]]]  # title, headers, rows


def model_rows(model: dict) -> Table:
    """One row per block of one model's summary."""
    with_data = model["data_vectors"] is not None
    headers = ["block", "activation", "in-hidden-out", "nnz W1", "density W1", "nnz W2", "density W2",
               "capacity sum", "mean |cos|"]
    if with_data:
        headers += ["dead", "always-on", "phi_max median", "phi_max p90"]
    rows = []
    for b in model["blocks"]:
        row = [b["block"], b["activation"], f"{b['in_features']}-{b['width']}-{b['out_features']}",
               b["first"]["nonzeros"], _cell(b["first"]["density"]), b["second"]["nonzeros"],
               _cell(b["second"]["density"]), _cell(b["capacity_sum"]), _cell(b["mean_abs_cosine"])]
        if with_data:
            act = b["activations"]
            row += [act["dead"], act["always_on"], _cell(act["phi_max_median"]), _cell(act["phi_max_p90"])]
        rows.append(row)
    data = f", {model['data_vectors']} activation vectors" if with_data else ""
    return f"{model['model']}: {len(rows)} MLP block(s){data}", headers, rows


def pair_rows(summary: dict) -> Table:
    """One row per paired block: each metric as ``before -> after``."""
    keys = [k for k in SHIFTED if any(p[k] != [None, None] for p in summary["pairs"])]
    rows: list[list[object]] = [
        [p["before"], p["matched_by"], fmt(p["alpha"])] + [f"{fmt(p[k][0])} -> {fmt(p[k][1])}" for k in keys]
        for p in summary["pairs"]
    ]
    headers = ["block", "matched by", "alpha"] + [LABELS[k] for k in keys]
    return "before -> after", headers, rows


def render(summary: dict) -> str:
    """The terminal report: one table per model, then the paired blocks, mismatches and notes."""
    parts = []
    for model in summary["models"]:
        title, headers, rows = model_rows(model)
        parts.append(format_table(headers, rows, title=title))
        if model["skipped"]:
            parts.append(format_table(("block", "reason"), [(s["block"], s["reason"]) for s in model["skipped"]],
                                      title="skipped"))
    if summary.get("pairs"):
        title, headers, rows = pair_rows(summary)
        parts.append(format_table(headers, rows, title=title))
    if summary.get("mismatches"):
        rows = [(m["model"], m["block"], m["reason"]) for m in summary["mismatches"]]
        parts.append(format_table(("model", "block", "not paired because"), rows, title="mismatches"))
    parts += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n\n".join(parts)
