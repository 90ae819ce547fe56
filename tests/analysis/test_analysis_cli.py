"""``neurorewrite analyze`` end to end: the tables and --json agree, bad input fails in one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from neurorewrite.analysis.summary import fmt
from neurorewrite.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _table(text: str, title_start: str) -> dict[str, dict[str, str]]:
    """Rows (by block) of the table whose title starts with ``title_start``; columns split on 2+ spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    header = lines[start + 1]
    dashes = lines[start + 2]
    spans, col = [], 0
    for width in (len(d) for d in dashes.split("  ")):
        spans.append((col, col + width))
        col += width + 2
    names = [header[a:b].strip() for a, b in spans]
    rows = {}
    for line in lines[start + 3:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in spans]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def _agrees(cell: str, value) -> bool:
    if value is None:
        return cell == "n/a"
    return cell == fmt(value) or float(cell) == pytest.approx(value, rel=5e-4)


def test_table_and_json_agree(models, sample, capsys, tmp_path):
    args = [models["mlp"].path, models["mlp_fpe"].path, "--data", sample[0]]
    code, text, _ = _run(capsys, *args)
    assert code == 0
    code, raw, _ = _run(capsys, *args, "--json")
    assert code == 0
    doc = json.loads(raw)
    columns = {"nnz W1": ("first", "nonzeros"), "density W1": ("first", "density"), "nnz W2": ("second", "nonzeros"),
               "density W2": ("second", "density"), "capacity sum": ("capacity_sum",), "mean |cos|": ("mean_abs_cosine",),
               "dead": ("activations", "dead"), "always-on": ("activations", "always_on"),
               "phi_max median": ("activations", "phi_max_median"), "phi_max p90": ("activations", "phi_max_p90")}
    for model in doc["models"]:
        rows = _table(text, model["model"] + ":")
        assert len(rows) == len(model["blocks"])
        for block in model["blocks"]:
            row = rows[block["block"]]
            for column, keys in columns.items():
                value = block
                for k in keys:
                    value = value[k]
                assert _agrees(row[column], value), (column, row[column], value)
    pairs = _table(text, "before -> after")
    (pair,) = doc["pairs"]
    row = pairs[pair["before"]]
    assert row["matched by"] == pair["matched_by"] and row["alpha"] == str(pair["alpha"])
    for column, key in (("capacity sum", "capacity_sum"), ("mean |cos|", "mean_abs_cosine"),
                        ("block nonzeros", "nonzeros"), ("dead %", "dead_percent"), ("hidden", "width")):
        before, after = row[column].split(" -> ")
        assert _agrees(before, pair[key][0]) and _agrees(after, pair[key][1]), column


def test_html_is_written(models, capsys, tmp_path):
    report = tmp_path / "report.html"
    code, out, _ = _run(capsys, models["mlp"].path, models["mlp_fpe"].path, "--html", report)
    assert code == 0 and f"wrote {report}" in out
    assert "data:image/png;base64," in report.read_text()


def _fails_cleanly(capsys, tmp_path, *argv, match: str) -> None:
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir(exist_ok=True)
    code, out, err = _run(capsys, *argv, "--html", report)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and match in err
    assert os.listdir(report.parent) == []


def test_no_mlp_blocks_is_a_one_line_error(models, capsys, tmp_path):
    _fails_cleanly(capsys, tmp_path, models["linear"].path, match="no MLP block")


def test_data_that_does_not_match_the_model_is_a_one_line_error(models, capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 5), np.float32))
    _fails_cleanly(capsys, tmp_path, models["mlp"].path, "--data", bad, match="input x expects shape")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    _fails_cleanly(capsys, tmp_path, models["mlp"].path, "--data", garbage, match="not a readable .npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(bad.read_bytes()[:60])  # a zip header, then nothing: zipfile.BadZipFile
    _fails_cleanly(capsys, tmp_path, models["mlp"].path, "--data", truncated, match="not a readable .npz")


def test_unwritable_report_path_is_a_one_line_error(models, capsys, tmp_path):
    code, out, err = _run(capsys, models["mlp"].path, "--html", tmp_path / "missing" / "r.html")
    assert code == 2 and out == "" and "folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--data", "--html", "--json"))
