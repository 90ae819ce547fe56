"""How long ``neurorewrite analyze`` takes on a MiniLM-sized transformer (6 FFN blocks, 384 -> 1536).

Builds a 6-layer torch TransformerEncoder (d_model 384, 6 heads, feed-forward 1536), exports it with
``torch.onnx.export(dynamo=True)``, expands it with ``neurorewrite.expand(alpha=4)``, then times
``analyze`` of the model alone and of the pair, without data and with a 256-row sample (sequence
length 8, so 2048 activation vectors per block), and the HTML report of the pair with data.
Targets (issue 5): under 60 s without data, under 120 s with 256 rows, on 2 cores.

Run from the repository root: ``.venv/bin/python -m benchmarks.analyze_speed``
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.machine import describe
from neurorewrite.table import format_table

LAYERS, D_MODEL, HEADS, FF, ALPHA = 6, 384, 6, 1536, 4
ROWS, SEQ = 256, 8


def build(folder: Path) -> tuple[Path, Path]:
    import torch

    import neurorewrite

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    # the layers start as copies of one another; the exporter would merge equal weights into shared
    # initializers (which expand rightly refuses to rewrite), so give every layer its own
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    path = folder / "minilm_sized.onnx"
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (torch.randn(2, SEQ, D_MODEL),), str(path), dynamo=True,
                          dynamic_shapes=({0: batch},), verbose=False)
    expanded = folder / "minilm_sized.fpe.onnx"
    neurorewrite.expand(path, alpha=ALPHA, output=expanded)
    return path, expanded


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    from neurorewrite.analysis import analyze
    from neurorewrite.analysis.html import render_html

    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        original, expanded = build(Path(tmp))
        x = np.random.default_rng(0).standard_normal((ROWS, SEQ, D_MODEL)).astype(np.float32)
        data = {"x": x}
        cases = [
            ("original", lambda: analyze(original), 60),
            ("original + 256 rows", lambda: analyze(original, data=data), 120),
            ("original vs expanded", lambda: analyze(original, expanded), 60),
            ("original vs expanded + 256 rows", lambda: analyze(original, expanded, data=data), 120),
        ]
        rows = []
        pair = None
        for name, fn, target in cases:
            seconds, analysis = timed(fn)
            blocks = len(analysis.model.blocks)
            widths = f"{analysis.model.blocks[0].width}" + (f" -> {analysis.other.blocks[0].width}" if analysis.other else "")
            vectors = analysis.model.data_vectors or 0
            rows.append((name, blocks, widths, vectors, round(seconds, 2), target, "yes" if seconds < target else "NO"))
            pair = analysis
        seconds, text = timed(lambda: render_html(pair))
        rows.append(("HTML report of the last (18 pictures)", len(pair.model.blocks), rows[-1][2], rows[-1][3],
                     round(seconds, 2), "-", "-"))
    print(format_table(("analyze", "blocks", "hidden", "vectors", "seconds", "target s", "met"), rows,
                       title=f"analyze on a {LAYERS}-layer encoder, d_model {D_MODEL}, ff {FF}, alpha {ALPHA}; "
                       f"sample {ROWS} rows x {SEQ} positions"))


if __name__ == "__main__":
    main()
