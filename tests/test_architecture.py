"""The layer rules of docs/architecture.md: every import of the package goes down the layers, never up.

Every ``import``/``from ... import`` statement is read from the source (inside functions too: a lazy
import is still a dependency), so a module that imports a higher layer fails here with its name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neurorewrite"

# room -> layer; a room is a top-level module or subpackage of ``neurorewrite``
LAYERS = {
    "errors": 0, "checks": 0, "atomic": 0, "table": 0, "progress": 0, "sample": 0, "paths": 0, "memory": 0,
    "external_data": 0,
    "fpe": 1, "ops": 1,
    "rewriter": 2, "kernels": 2, "executor": 2,
    "models": 3,
    "passes": 4,
    "runtime": 5,
    "api": 6, "analysis": 6,
    "commands": 7, "__init__": 7,
    "cli": 8,
}
ALWAYS_ALLOWED = {"errors"}  # the typed errors are the floor every room stands on


def room_of(module: str) -> str:
    """``neurorewrite.passes.fold_tied`` -> ``passes``; ``neurorewrite`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``neurorewrite`` module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    module_name = ".".join(("neurorewrite", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module_name.rsplit(".", 1)[0]  # a module's package; for an __init__, its own package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "neurorewrite"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] == "neurorewrite":
                found += [(node.lineno, module)]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = "__init__" if rel == Path("__init__.py") else rel.parts[0].removesuffix(".py")
        if own not in LAYERS:
            out.append(f"{rel}: room {own!r} has no layer in tests/test_architecture.py (add it, and to docs/architecture.md)")
            continue
        for line, module in imports_of(path):
            target = room_of(module)
            if target == own or target in ALWAYS_ALLOWED:
                continue
            if target not in LAYERS:
                out.append(f"{rel}:{line} imports {module}, a room with no layer")
            elif LAYERS[target] >= LAYERS[own]:
                out.append(f"{rel}:{line} ({own}, layer {LAYERS[own]}) imports {module} ({target}, layer {LAYERS[target]})")
    return out


def test_imports_follow_the_layers() -> None:
    problems = violations()
    assert not problems, "layer rule broken:\n" + "\n".join(problems)


def test_the_rule_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch) -> None:
    # a planted upward import inside a function, and a relative one, in a copy of a low room
    fake = tmp_path / "neurorewrite"
    (fake / "fpe").mkdir(parents=True)
    (fake / "fpe" / "__init__.py").write_text("")
    (fake / "fpe" / "bad.py").write_text("def f():\n    from neurorewrite.runtime import ort\n\nfrom ..passes import lower\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    problems = violations()
    assert any("bad.py:2" in p and "runtime" in p for p in problems), problems
    assert any("bad.py:4" in p and "passes" in p for p in problems), problems


@pytest.mark.parametrize("room", sorted({r for r in LAYERS if r != "__init__"}))
def test_every_room_exists(room: str) -> None:
    assert (PACKAGE / room).is_dir() or (PACKAGE / f"{room}.py").is_file(), f"docs/architecture.md names {room}, which is gone"
