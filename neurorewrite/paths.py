"""The rule that no command writes over one of its inputs, however the paths are spelled.

Every command lists the files it reads (the model and its external data, a sample, training data, a
teacher, a tuning database) and the files it will write or delete (the output, its sidecars, the
stale data a new model replaces), each with the option that named it, and calls
:func:`check_no_overwrite` before any work. Two paths are the same file when they resolve to the same
place (relative, absolute, ``..``, symlinks) or, for files that exist, have the same device and inode
(hard links). A refusal is one line naming both options.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from neurorewrite.errors import OutputError

Labeled = tuple[str, "str | os.PathLike[str]"]  # (what named it, e.g. "--data" or "the model", path)


def resolve(path: str | os.PathLike[str]) -> Path:
    """The absolute path with every symlink and ``..`` resolved (a missing file's folder is resolved)."""
    return Path(os.path.realpath(os.fspath(path)))


def _identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether writing ``a`` would change what is read at ``b`` (same resolved path, or a hard link)."""
    if resolve(a) == resolve(b):
        return True
    ia, ib = _identity(a), _identity(b)
    return ia is not None and ia == ib


def check_no_overwrite(inputs: Iterable[Labeled], outputs: Iterable[Labeled]) -> None:
    """Raise OutputError when any output is the same file as any input (or as another output).

    ``inputs`` and ``outputs`` are ``(label, path)`` pairs; the label says where the path came from
    (``"-o"``, ``"--data"``, ``"the model's external data"``, ...).
    """
    ins = list(inputs)
    outs = list(outputs)
    for k, (out_label, out) in enumerate(outs):
        for in_label, inp in ins:
            if same_file(out, inp):
                raise OutputError(
                    f"{out_label} {os.fspath(out)} is the same file as {in_label} {os.fspath(inp)}: "
                    "a command never writes over its inputs; choose another output path"
                )
        for other_label, other in outs[k + 1:]:
            if same_file(out, other):
                raise OutputError(f"{out_label} {os.fspath(out)} and {other_label} {os.fspath(other)} are the same "
                                  "file; choose different output paths")


def check_output_target(path: str | os.PathLike[str], option: str) -> None:
    """Refuse an output path that exists and is not a regular file (a folder, a device such as
    /dev/null, a FIFO, a socket): a rename over it would replace it, or a write would block."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{option} {os.fspath(path)} is a folder; give a file name inside it")
    if (p.exists() or p.is_symlink()) and not p.is_file():
        raise OutputError(f"{option} {os.fspath(path)} exists and is not a regular file; choose another output path")


def check_output_folder(path: str | os.PathLike[str], option: str) -> None:
    """Before any work: ``path`` is a possible output (see :func:`check_output_target`) in a folder that
    exists and can be written."""
    check_output_target(path, option)
    folder = Path(path).parent
    if not folder.is_dir():
        raise OutputError(f"{option} {os.fspath(path)}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {os.fspath(path)}: folder {folder} is not writable")


def tagged_output(path: str | os.PathLike[str], tag: str) -> Path:
    """``model.onnx`` -> ``model.<tag>.onnx`` beside it (``.onnx`` when the input has no suffix): never the input."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{tag}{p.suffix or '.onnx'}")


def suffixed_output(path: str | os.PathLike[str], suffix: str) -> Path:
    """``model.onnx`` -> ``model<suffix>`` beside it; an input that already ends in ``suffix`` (``w.so``)
    gets it appended (``w.so.so``), so the default output is never the input."""
    p = Path(path)
    candidate = p.with_suffix(suffix) if p.suffix else p.with_name(p.name + suffix)
    return candidate if candidate.name != p.name else p.with_name(p.name + suffix)
