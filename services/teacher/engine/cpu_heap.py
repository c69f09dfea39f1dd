"""Keep freed memory in the process heap, so a CPU engine's per-batch buffers are not page-faulted in anew.

glibc's malloc serves any block above its mmap threshold (at most 32 MB, adjusted at run time) with a fresh
`mmap` and returns it to the kernel on `free`: every batch's activations and logit chunks (tens of MB each) are
then zero-filled page by page, again and again. On 2 cores this cost the float32 SmolLM2 engine ~15% of its
time (docs/results/teacher_throughput.md). Raising the mmap and trim thresholds keeps those blocks in the heap
for reuse: the process holds its peak memory instead of returning it between batches, as jemalloc or tcmalloc
would (PyTorch's CPU performance guide recommends either). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; the heap is trimmed only above 2 GiB free
TRIM_BYTES = 2 << 30


@functools.cache
def keep_heap() -> bool:
    """Sets the thresholds once per process; True where they took effect (glibc), False elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
