"""Host memory of a training process on CPU: give freed activation memory back to the operating system.

glibc serves allocations above its mmap threshold with their own mappings, returned to the OS on free, and
everything else from its heap. By default the threshold is dynamic: each time a mapped block is freed it rises to
that block's size (up to 32 MiB), so after the first step nearly every activation of a training step comes from
the heap. Steps of different shapes (length-grouped batches) then fragment it, and the process's resident memory
keeps the high-water mark of all of them: measured on a LoRA step of the 34M-parameter benchmark model, 3.1 GB
peak RSS where the tensors alive at once need 1.8 GB (bench/README.md). A fixed threshold keeps large tensors in
their own mappings, so resident memory follows what is actually alive, at the price of page faults when a
mapping is first touched: slower steps (measured in bench/README.md). The trainer does this on CPU when
train.gradient_checkpointing asks for the memory-saving mode.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 64 * 1024  # blocks of 64 KiB or more get their own mapping; setting it disables the dynamic rise


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for the rest of this process; False where that is not possible (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: leave their allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
