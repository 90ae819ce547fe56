"""The report's pictures as PNG bytes, drawn with matplotlib's Agg canvas (no pyplot, no display).

Every picture has a title, axis labels and, for heatmaps, a colour bar. Large layers arrive already
summarised (see :class:`GramPreview` and :class:`SparsityPreview`); the titles say how.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from neurorewrite.analysis.result import GramPreview, SparsityPreview

DPI = 100
MAX_PARENT_LINES = 32  # draw parent boundaries only while they stay readable


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)  # never clip a label
    return buf.getvalue()


def gram_caption(g: GramPreview, unit: str) -> str:
    if g.summarised:
        return f"first {g.rows} of {g.of} {unit}"
    return f"all {g.of} {unit}"


def gram_figure(panels: list[tuple[str, GramPreview]]) -> bytes:
    """Cosine Gram heatmaps of neuron weight rows, side by side (e.g. before and after)."""
    fig = Figure(figsize=(4.6 * len(panels) + 1.2, 4.8), layout="constrained")
    image = None
    for i, (label, g) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        image = ax.imshow(g.matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        unit = "children" if g.group > 1 else "neurons"
        ax.set_title(f"{label}\n{gram_caption(g, unit)}", fontsize=10)
        what = f"child (grouped by parent, {g.group} each)" if g.group > 1 else "neuron (row of W1)"
        ax.set_xlabel(what)
        ax.set_ylabel(what)
        if g.group > 1 and g.rows // g.group <= MAX_PARENT_LINES:
            for edge in np.arange(g.group, g.rows, g.group) - 0.5:
                ax.axhline(edge, color="0.5", lw=0.4)
                ax.axvline(edge, color="0.5", lw=0.4)
    fig.colorbar(image, ax=fig.axes, label="cosine similarity of weight rows", shrink=0.9)
    fig.suptitle("Gram matrix of first-layer neuron weights (cosine)", fontsize=11)
    return _png(fig)


def sparsity_caption(s: SparsityPreview) -> str:
    if s.tile == (1, 1):
        return f"{s.shape[0]} x {s.shape[1]}, every weight shown"
    return f"{s.shape[0]} x {s.shape[1]}, pooled: each cell is a tile of up to {s.tile[0]} x {s.tile[1]} weights"


def sparsity_figure(previews: list[SparsityPreview], title: str) -> bytes:
    """The nonzero pattern of each weight (fraction nonzero per tile; black = dense)."""
    fig = Figure(figsize=(4.6 * len(previews) + 1.2, 4.8), layout="constrained")
    image = None
    for i, s in enumerate(previews):
        ax = fig.add_subplot(1, len(previews), i + 1)
        # extent in weight indices, so the axes count weights even when cells are pooled tiles
        image = ax.imshow(s.pooled, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                          extent=(0, s.shape[1], s.shape[0], 0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{s.layer}\n{sparsity_caption(s)}", fontsize=10)
        ax.set_xlabel("input (column of W)")
        ax.set_ylabel("output (row of W)")
    fig.colorbar(image, ax=fig.axes, label="fraction of weights nonzero", shrink=0.9)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def _phi_bins(arrays: list[np.ndarray]) -> np.ndarray:
    positive = np.concatenate([a[a > 0] for a in arrays]) if arrays else np.array([])
    if positive.size == 0:
        return np.array([0.1, 1.0, 10.0])
    lo, hi = float(positive.min()), float(positive.max())
    hi = hi * 1.01 if hi > lo else lo * 10
    return np.logspace(np.log10(lo), np.log10(hi), 31)


def histogram_figure(
    capacity: list[tuple[str, np.ndarray]], phi: list[tuple[str, np.ndarray]], title: str
) -> bytes:
    """Capacity per input feature and, with data, phi_max per neuron; series overlaid as fractions."""
    fig = Figure(figsize=(11 if phi else 5.6, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 2 if phi else 1, 1)
    for label, values in capacity:
        ax.hist(values, bins=np.linspace(0, 1, 51), weights=np.full(values.size, 1 / max(values.size, 1)),
                alpha=0.55, label=f"{label} (sum {values.sum():.4g})")
    ax.set_xlabel("feature capacity C_j (0 = unused, 1 = no interference)")
    ax.set_ylabel("fraction of input features")
    ax.set_title("feature capacity", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    if phi:
        ax = fig.add_subplot(1, 2, 2)
        bins = _phi_bins([v for _, v in phi])
        for label, values in phi:
            zero = int(np.count_nonzero(values <= 0))
            ax.hist(values[values > 0], bins=bins, weights=np.full(int((values > 0).sum()), 1 / max(values.size, 1)),
                    alpha=0.55, label=f"{label}: median {np.median(values):.3g}, {zero} constant (not shown)")
        ax.set_xscale("log")
        ax.set_xlabel("phi_max: largest monosemantic scale over the sample")
        ax.set_ylabel("fraction of neurons")
        ax.set_title("monosemantic scale per neuron", fontsize=10)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    return _png(fig)
