"""How much memory this machine has, and the refusal of options that could never fit in it.

A command whose options need more memory than the machine has would run for minutes and then be
killed (or ask numpy for hundreds of GiB); :func:`check_fits` refuses it up front with the figure.
The comparison is against physical memory plus swap, not the memory free right now: a request that
fits the machine is the user's to make.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

from neurorewrite.errors import InvalidOptionError

GIB = 1 << 30


def machine_memory() -> int:
    """Physical memory plus swap, in bytes (from /proc/meminfo; sysconf where it is missing)."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "SwapTotal"):
                    total += int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        total = 0
    if total:
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 0


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits(need: int, what: str, hint: str = "") -> None:
    """Raise InvalidOptionError when ``need`` bytes exceed :func:`machine_memory` (unknown: no check).

    ``what`` says what needs the memory, e.g. ``"--alpha 64 with --calibrate (a Gram matrix of ...)"``.
    """
    have = machine_memory()
    if have and need > have:
        tail = f"; {hint}" if hint else ""
        raise InvalidOptionError(f"{what} needs about {gib(need)} of memory; this machine has {gib(have)}{tail}")


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there is none.

    Why: the arrays a pass frees stay in the process's resident memory as free heap, and the next step's
    allocations (the checker's serialized copy of the model) stack on top of them: MiniLM's calibration
    peaked at 1.77-1.89 GB without this, 1.52-1.74 GB with it (``benchmarks/RESULTS.md``, "Constant inputs")."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no C library found, or one without malloc_trim (musl, macOS)
        return None
