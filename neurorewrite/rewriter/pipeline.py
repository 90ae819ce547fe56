"""The pass manager: runs named passes in order, checks the model after each, names the one that broke.

A pass here is ``(model, report) -> (model, report)``: it returns a new model and the report it
extends (the first pass makes the report). The manager checks every intermediate model with the ONNX
checker, so a pass that writes an invalid graph is named at once instead of surfacing later as a
failure somewhere else. User errors (``NeurorewriteError``) pass through unchanged; anything else is a
bug in a pass and is reported as :class:`PassError` naming the pass and the ones that ran before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import onnx

from neurorewrite.errors import NeurorewriteError, first_line
from neurorewrite.memory import release_free_memory
from neurorewrite.rewriter.io import checkable_in_memory

R = TypeVar("R")


class PassError(NeurorewriteError):
    """A pass failed on a model it accepted: an internal error, reported with the pass history."""


@dataclass(frozen=True)
class Pass(Generic[R]):
    name: str
    run: Callable[[onnx.ModelProto, R | None], tuple[onnx.ModelProto, R]]


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass[R]]) -> tuple[onnx.ModelProto, R | None]:
    """Run ``passes`` in order; the input model is never modified (each pass returns a new one)."""
    report: R | None = None
    done: list[str] = []
    for p in passes:
        try:
            model, report = p.run(model, report)
            release_free_memory()  # what the pass freed, before the checker serializes the model beside it
            if checkable_in_memory(model):  # larger (or spilled) ones are checked on disk at save
                onnx.checker.check_model(model)
        except NeurorewriteError:
            raise
        except Exception as e:
            history = ", ".join(done) if done else "no earlier pass"
            raise PassError(f"pass '{p.name}' failed (after {history}): {first_line(e)}; please report this") from e
        done.append(p.name)
    return model, report
