"""Block formats are registered by name: --format's choices come from the registry, and a new one is one registration."""

from __future__ import annotations

import pytest

from neurorewrite.cli import build_parser
from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.lowering import LOWERINGS, check_format, register_lowering


def _format_choices() -> tuple[str, ...]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    expand = sub.choices["expand"]
    return tuple(next(a for a in expand._actions if a.dest == "format").choices)


def test_the_cli_offers_the_registered_formats() -> None:
    assert _format_choices() == tuple(LOWERINGS) == ("dense", "grouped", "sparse")


def test_a_new_format_is_one_registration(monkeypatch) -> None:
    monkeypatch.setitem(LOWERINGS, "dense", LOWERINGS["dense"])  # restores the dict's contents afterwards
    monkeypatch.delitem(LOWERINGS, "blocked-test", raising=False)
    register_lowering("blocked-test", "a test format")(lambda editor, model, blocks, alpha: [])
    try:
        assert "blocked-test" in _format_choices()
        assert check_format("blocked-test", "random") == "blocked-test"
    finally:
        del LOWERINGS["blocked-test"]


def test_one_partition_formats_check_the_split() -> None:
    with pytest.raises(InvalidOptionError, match="--format grouped needs one input partition"):
        check_format("grouped", "random")
    with pytest.raises(InvalidOptionError, match="--format must be one of dense, grouped, sparse"):
        check_format("bsr")
