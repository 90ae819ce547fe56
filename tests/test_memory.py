"""release_free_memory hands freed heap pages back to the system: what a pass freed stops counting in the
process's resident memory before the next step allocates."""

from __future__ import annotations

import gc
import os

import pytest

from neurorewrite.memory import _malloc_trim, release_free_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_malloc_trim() is None, reason="no C library with malloc_trim (glibc) here")
def test_freed_heap_leaves_the_resident_memory() -> None:
    # 64 KiB blocks stay below malloc's mmap threshold: they come from the heap, and the block kept last
    # pins the heap's top, so freeing the others leaves 200 MB of free heap malloc does not return itself
    blocks = [bytearray(64 << 10) for _ in range(3200)]
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    keep = bytearray(64 << 10)
    del blocks
    gc.collect()
    before = resident_bytes()
    assert release_free_memory()
    after = resident_bytes()
    assert before - after > 100 << 20, (before >> 20, after >> 20)
    del keep
