"""Real English sentences that ship offline: the prose of Python's own documentation and scikit-learn's.

Sources, nothing downloaded: ``pydoc_data.topics`` (the Language and Library Reference text ``help()``
shows), the docstrings of the standard library's modules, classes and functions (read with ``ast``,
tests left out), and scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``).

A paragraph is split into sentences at ``. ``/``? ``/``! `` before a capital letter; a sentence is kept
with 6 to 50 words, a capital first letter, a final ``.``/``?``/``!`` and mostly letters (code lines
fail that). Duplicates go; the list is sorted and shuffled with a fixed seed. :func:`split` puts a
sentence in the evaluation set when the first byte of its md5 is below 64 (25%), so fitting and
evaluation never share a sentence, whatever the sources add or lose.

    python -m benchmarks.text_corpus     # counts and a few sentences
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import random
import re
import sysconfig

_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z\"'(])")
_ABBREVIATION = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|al|Fig|No)\.$")
_SKIP = re.compile(r"([*=\-~^+|#])\1{2,}")


def _paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines at one indentation; headings' underlines, bullets, tables and doctest
    lines end a run and are dropped."""
    out: list[str] = []
    run: list[str] = []
    indent = None
    for line in text.splitlines() + [""]:
        body = line.strip()
        depth = len(line) - len(line.lstrip())
        skip = not body or _SKIP.fullmatch(body) is not None or body.startswith(("* ", "- ", "|", "+-", "..", ">>>"))
        if skip or (run and depth != indent):
            if run:
                out.append(" ".join(run))
            run, indent = [], None
        if not skip:
            run.append(body)
            indent = depth
    return out


def _sentences(paragraph: str) -> list[str]:
    merged: list[str] = []
    for part in _SPLIT.split(paragraph):
        if merged and _ABBREVIATION.search(merged[-1]):
            merged[-1] += " " + part
        else:
            merged.append(part)
    return merged


def _good(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 50 or not sentence[0].isupper() or sentence[-1] not in ".?!":
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.85 * len(sentence) and "::=" not in sentence and "http" not in sentence


def _texts() -> list[str]:
    import pydoc_data.topics as topics

    texts = [topics.topics[k] for k in sorted(topics.topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py"))):
        rel = os.path.relpath(path, stdlib)
        if rel.startswith(("test", "idlelib", "lib2to3", "site-packages", "turtledemo", "pydoc_data")):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    try:
        import sklearn

        for path in sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr", "*.rst"))):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    except ImportError:
        pass
    return texts


def sentences(seed: int = 0) -> list[str]:
    """Every distinct sentence, in a fixed shuffled order."""
    seen: set[str] = set()
    for text in _texts():
        for paragraph in _paragraphs(text):
            for s in _sentences(re.sub(r"\s+", " ", paragraph).strip()):
                s = s.replace('"', "")
                if _good(s):
                    seen.add(s)
    out = sorted(seen)
    random.Random(seed).shuffle(out)
    return out


def split(seed: int = 0) -> tuple[list[str], list[str]]:
    """``(fit, evaluation)`` sentences: disjoint and deterministic."""
    every = sentences(seed)
    held = [hashlib.md5(s.encode()).digest()[0] < 64 for s in every]
    return [s for s, h in zip(every, held) if not h], [s for s, h in zip(every, held) if h]


if __name__ == "__main__":
    fit, evaluation = split()
    print(f"{len(fit) + len(evaluation)} sentences: {len(fit)} to fit, {len(evaluation)} to evaluate")
    for s in evaluation[:5]:
        print(" -", s)
