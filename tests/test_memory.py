"""raysl.memory.trim: freed heap memory goes back to the system (glibc)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from raysl.memory import _malloc_trim, trim


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None,
                    reason="glibc's malloc_trim (Linux)")
def test_trim_returns_freed_arrays_to_the_system() -> None:
    """What the pipeline's stages leave: after one large array is freed, glibc serves arrays
    of a few MB from its heap, and freeing them keeps them resident (small live objects
    between them stop the heap from shrinking). trim() gives them back."""
    big = np.ones(24 << 20, np.uint8)  # its free raises glibc's mmap threshold
    del big
    arrays, pins = [], []
    for _ in range(40):
        arrays.append(np.ones(2 << 20, np.uint8))  # 2 MB, touched
        pins.append(np.ones(64, np.uint8).tobytes() * 2)  # small, kept: fragments the heap
    del arrays
    before = _rss()
    assert trim() in (True, False)
    released = before - _rss()
    # ~32 MB here (glibc shrinks the top of the heap by itself; the rest is what trim frees)
    assert released > 16 << 20, f"released {released / 2**20:.1f} MB of the ~80 MB freed"
    assert len(pins) == 40
