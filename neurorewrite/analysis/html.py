"""The self-contained HTML report: summary tables and every picture embedded as a base64 PNG.

The file is written atomically (a temporary file in the same folder, then a rename), so a failed run
leaves nothing behind and never half-replaces an older report.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable
from pathlib import Path

from neurorewrite.analysis import plots
from neurorewrite.analysis.result import Analysis, BlockAnalysis
from neurorewrite.analysis.summary import fmt, model_rows, pair_rows, summarize
from neurorewrite.atomic import write_bytes_atomically
from neurorewrite.errors import OutputError
from neurorewrite.paths import check_output_target

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#eee}td.n{text-align:right}img{max-width:100%;display:block;margin:0.5em 0}
.note{color:#555;font-size:13px}"""

DEFINITIONS = (
    "Feature capacity C_j = (G_jj)^2 / sum_k G_jk^2 with G = W1^T W1 (1 = the input feature does not "
    "interfere, 0 = unused). Mean |cos|: mean absolute cosine similarity over pairs of nonzero neuron rows "
    "of W1. phi_max: a neuron's largest monosemantic scale (z-mu)^2/(s^2 + 0.01 mean(s^2)) over the sample. "
    "Dead: the activation is 0 on every sample vector; always-on: positive on every one."
)


def check_output(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when the report cannot be written at ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"--html {path}: is a folder; give a file name such as {path / 'report.html'}")
    check_output_target(path, "--html")
    if not folder.is_dir():
        raise OutputError(f"--html {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"--html {path}: folder {folder} is not writable")
    return path


def write_report(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file beside it, then rename)."""
    path = check_output(path)
    try:
        write_bytes_atomically(path, text.encode("utf-8"))
    except (OSError, UnicodeError) as e:
        raise OutputError(f"--html {path}: could not write the report ({e})") from e
    return path


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(title: str, headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="{"n" if isinstance(v, (int, float)) else ""}">{html.escape(fmt(v))}</td>' for v in row
        ) + "</tr>"
        for row in rows
    )
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>"


def _block_section(title: str, blocks: list[tuple[str, BlockAnalysis]]) -> str:
    """Pictures of one block (one model) or of a pair (before, after)."""
    parts = [f"<h2>{html.escape(title)}</h2>"]
    parts.append(_img(plots.gram_figure([(label, b.gram) for label, b in blocks]), f"Gram matrices of {title}"))
    last_label, last = blocks[-1]
    if last.sparsity:
        parts.append(_img(plots.sparsity_figure(last.sparsity, f"nonzero pattern, {last_label}"),
                          f"sparsity pattern of {title}"))
    short = ["before", "after"] if len(blocks) == 2 else [Path(label).name for label, _ in blocks]
    capacity = [(name, b.capacity) for name, (_, b) in zip(short, blocks)]
    phi = [(name, b.activations.phi_max) for name, (_, b) in zip(short, blocks) if b.activations is not None]
    parts.append(_img(plots.histogram_figure(capacity, phi, title), f"histograms of {title}"))
    return "\n".join(parts)


def _sections(analysis: Analysis) -> list[tuple[str, list[tuple[str, BlockAnalysis]]]]:
    first = analysis.model
    if analysis.other is None or analysis.matching is None:
        return [(f"block {b.name}", [(Path(first.label).name, b)]) for b in first.blocks]
    other = analysis.other
    a, b = Path(first.label).name, Path(other.label).name  # picture titles: file names, not whole paths
    out = [(f"block {p.before} (before) / {p.after} (after)",
            [(f"before: {a}", first.block(p.before)), (f"after: {b}", other.block(p.after))])
           for p in analysis.matching.pairs]
    for m in analysis.matching.mismatches:
        model = first if m.model == "first" else other
        out.append((f"unpaired block {m.block} of {model.label}", [(Path(model.label).name, model.block(m.block))]))
    return out


def render_html(analysis: Analysis, progress: Callable[[int, int, str], None] | None = None) -> str:
    """The whole report as one HTML string (pictures included)."""
    summary = summarize(analysis)
    labels = " vs ".join(m["model"] for m in summary["models"])  # type: ignore[index]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>neurorewrite analyze: "
             f"{html.escape(labels)}</title><style>{STYLE}</style></head><body>",
             f"<h1>neurorewrite analyze: {html.escape(labels)}</h1>", f"<p class='note'>{html.escape(DEFINITIONS)}</p>",
             "<p class='note'>Large layers are summarised, never skipped: Gram matrices show the first neurons "
             "(for a pair, the same parents before and their children after); sparsity patterns are pooled into "
             "tiles, each cell showing the fraction of nonzero weights in its tile. Each picture's title says which."
             "</p>"]
    for model in summary["models"]:  # type: ignore[union-attr]
        parts.append(_table(*model_rows(model)))
        if model["skipped"]:
            parts.append(_table("skipped", ["block", "reason"], [[s["block"], s["reason"]] for s in model["skipped"]]))
    if summary.get("pairs"):
        parts.append(_table(*pair_rows(summary)))
    if summary.get("mismatches"):
        rows = [[m["model"], m["block"], m["reason"]] for m in summary["mismatches"]]  # type: ignore[union-attr]
        parts.append(_table("mismatches", ["model", "block", "not paired because"], rows))
    parts += [f"<p class='note'>note: {html.escape(n)}</p>" for n in summary.get("notes", [])]  # type: ignore[union-attr]
    sections = _sections(analysis)
    for i, (title, blocks) in enumerate(sections):
        if progress is not None:
            progress(i, len(sections), title)
        parts.append(_block_section(title, blocks))
    if progress is not None:
        progress(len(sections), len(sections), "done")
    parts.append("</body></html>")
    return "\n".join(parts)
