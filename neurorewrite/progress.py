"""A small progress bar on stderr for steps that take more than a few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar(done, total, label)`` redraws one line; silent when stderr is not a terminal unless forced."""

    def __init__(self, title: str, stream: TextIO | None = None, force: bool = False, width: int = 30) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.width = width
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        filled = int(self.width * done / total)
        elapsed = time.monotonic() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.title} [{bar}] {done}/{total} {elapsed:5.1f}s {label[:40]:<40}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
