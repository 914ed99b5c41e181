"""glibc's allocator settings for PyTorch's large tensors: no torch import here, so the command line can apply them
before any command without paying torch's import time for `--help` or a refused flag."""

from __future__ import annotations

import ctypes
import functools
import os
import sys


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in the process instead of returning them to the OS (glibc only).

    By default glibc serves every allocation over 128 KiB with a fresh mmap and unmaps it on free, so each new
    activation or batch tensor of a few MB is page-faulted in again, every step: on our 2-core machines that cost
    more than the arithmetic of the data path (8 ms to allocate a 6 MB batch, 0.07 ms to reuse one) and a large share
    of eager inference. Raising the mmap threshold to its maximum (32 MiB) and the trim threshold makes PyTorch's
    allocations reuse warm memory, as jemalloc/tcmalloc would. Returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    # The user's own allocator settings (an RSS cap for a container, say) are not overridden
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc." in os.getenv("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, 1 << 30))
