"""The lock that makes a model and its data file one unit: writers publish a pair under it
exclusively, readers of this package take it shared while they read a pair."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, shared: bool) -> Iterator[None]:
    """Hold ``flock`` on ``folder`` (shared for readers, exclusive for a writer publishing a pair).

    A lock that cannot be taken (a folder that cannot be opened, a filesystem without flock) is skipped:
    the unique data file names still keep pairs from mixing; the lock only closes the window in which a
    reader could find the old model after a writer removed its data. The kernel drops the lock when the
    holder dies, so a killed writer never blocks the next one.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (best effort: some filesystems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
