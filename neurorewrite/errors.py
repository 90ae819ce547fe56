"""Typed errors for everything a user can get wrong.

The CLI prints ``str(error)`` as one line on stderr and exits non-zero, so every message names the
file, node or option at fault and says what to do about it.
"""

from __future__ import annotations


class NeurorewriteError(Exception):
    """Base class of every user-facing failure."""

    exit_code = 2


class InvalidOptionError(NeurorewriteError):
    """An option value is out of range or malformed (alpha, split, groups, ...)."""


class ModelLoadError(NeurorewriteError):
    """A file is missing, not ONNX, truncated, or fails the ONNX checker."""


class NoBlocksError(NeurorewriteError):
    """The model holds no MLP block that the pass can rewrite."""


class DataError(NeurorewriteError):
    """A sample/training data file is unreadable or does not match the model."""


class OutputError(NeurorewriteError):
    """The output path cannot be written."""


class VerificationError(NeurorewriteError):
    """A rewritten model failed a postcondition (checker, counts); nothing was written."""


class UnsupportedModelError(NeurorewriteError):
    """A valid model uses something a command cannot handle (e.g. an op finetune cannot lift into torch)."""


class NeurorewriteWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. NaN weights in an input);
    the CLI prints it as one line."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of ``error``'s message (its type name if it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def last_line(error: BaseException) -> str:
    """The last line of ``error``'s message (its type name if it has none): TVM puts its traceback first
    and the actual complaint last."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
