"""Reusable memory for the two full-size tensors MEmeL's fused path creates each step.

The fused forward returns a new tensor (the activation with its selected elements replaced) and the
backward a new gradient. For a large activation (a transformer FFN's, 25 MB for batch 16 x 128 x
3072) glibc gives such allocations back to the system when they are freed and faults every page in
again at the next step: measured on the transformer benchmark, thousands of page faults per step,
about as costly as the kernel itself. :class:`BufferPool` keeps a few buffers per module and hands
one out again only when no tensor uses it any more.

Invariant: a buffer is reused only when nothing references its memory. The pool keeps numpy arrays
and hands out ``torch.from_numpy`` tensors; torch holds a reference to the array as long as any
tensor or view sharing that memory lives (an autograd graph that saved one included), so the array's
reference count is the test. When every buffer is in use (a graph kept across steps, an output
stored by the caller), :meth:`BufferPool.empty` allocates a fresh one, so correctness never depends
on the pool. Memory cost: up to ``slots`` buffers of the activation's size stay allocated per pool.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import Tensor

__all__ = ["BufferPool"]


def _references(arrays: list[np.ndarray], position: int) -> int:
    """The reference count of ``arrays[position]``; the same call on an array nothing else holds gives
    :data:`_FREE`, so the two counts compare like for like whatever the interpreter counts."""
    return sys.getrefcount(arrays[position])


_FREE = _references([np.empty(0, np.float32)], 0)


class BufferPool:
    """Up to ``slots`` float32 CPU buffers, reused by :meth:`empty` once no tensor uses them."""

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self._arrays: list[np.ndarray] = []

    def empty(self, shape: torch.Size) -> Tensor:
        """An uninitialised float32 tensor of ``shape``, from a free pooled buffer when there is one."""
        size = math.prod(shape)
        spare = None
        for position in range(len(self._arrays)):
            if _references(self._arrays, position) == _FREE:
                if self._arrays[position].size == size:  # numpy's reshape is cheaper than torch's view
                    return torch.from_numpy(self._arrays[position].reshape(shape))
                spare = position
        array = np.empty(size, np.float32)
        if spare is not None:  # a free buffer of another size (the batch size changed): replace it
            self._arrays[spare] = array
        elif len(self._arrays) < self.slots:
            self._arrays.append(array)
        return torch.from_numpy(array.reshape(shape))
