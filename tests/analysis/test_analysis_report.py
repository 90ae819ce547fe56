"""The HTML report: it parses, every embedded picture is a PNG that decodes, and it is written atomically."""

from __future__ import annotations

import base64
import io
import os
from html.parser import HTMLParser

import matplotlib.image
import pytest
from conftest import export, mlp

import neurorewrite
from neurorewrite.analysis import analyze
from neurorewrite.analysis.html import render_html, write_report
from neurorewrite.errors import OutputError

PNG = b"\x89PNG\r\n\x1a\n"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _decoded_images(text: str) -> list:
    parser = _Images()
    parser.feed(text)
    parser.close()
    assert "table" in parser.tags
    images = []
    for src in parser.sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)  # self-contained: no file or network references
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data.startswith(PNG)
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        images.append(pixels)
    return images


def test_pair_report_parses_and_every_picture_decodes(models, sample, tmp_path):
    analysis = analyze(models["mlp"].path, models["mlp_fpe"].path, data=sample[0])
    text = render_html(analysis)
    assert len(_decoded_images(text)) == 3  # Gram before/after, sparsity after, histograms
    assert "FPE metadata" in text and "phi_max" in text
    path = write_report(text, tmp_path / "report.html")
    assert path.read_text(encoding="utf-8") == text
    assert os.listdir(tmp_path) == ["report.html"]


def test_one_model_report_without_data(models):
    text = render_html(analyze(models["chain"].path))
    assert len(_decoded_images(text)) == 6  # per block: Gram, sparsity, capacity histogram


def test_large_layers_are_summarised_and_say_how(tmp_path):
    path = export(mlp(h=300), tmp_path / "wide.onnx").path
    expanded = tmp_path / "wide.fpe.onnx"
    neurorewrite.expand(path, alpha=4, output=expanded)
    analysis = analyze(path, expanded)
    before, after = analysis.model.blocks[0], analysis.other.blocks[0]
    # the same 64 parents before and their 256 children after, out of 300 and 1200
    assert (before.gram.rows, before.gram.of, after.gram.rows, after.gram.of) == (64, 300, 256, 1200)
    assert before.gram.summarised and after.gram.matrix.shape == (256, 256)
    w2 = after.sparsity[1]
    assert w2.shape == (3, 1200) and w2.tile == (1, 5) and w2.pooled.shape == (3, 256)
    assert 0 < w2.pooled.mean() < 1
    assert len(_decoded_images(render_html(analysis))) == 3


def test_an_unwritable_path_raises_and_writes_nothing(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for bad in (tmp_path / "missing" / "r.html", blocker / "r.html", tmp_path):
        with pytest.raises(OutputError, match="--html"):
            write_report("<html></html>", bad)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_a_failed_write_keeps_the_old_report_and_leaves_no_temporary_file(tmp_path):
    old = tmp_path / "report.html"
    old.write_text("old report")
    with pytest.raises(OutputError, match="could not write"):
        write_report("label from a non-UTF-8 file name: \udc80", old)  # cannot be encoded
    assert old.read_text() == "old report"
    assert os.listdir(tmp_path) == ["report.html"]
