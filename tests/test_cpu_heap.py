"""engine/cpu_heap.py: a freed large block stays in the process (no page faults when the next batch allocates it
again), and a CPU engine sets it up unless told not to."""

from __future__ import annotations

import os

import pytest
import torch

from services.teacher.engine import cpu_heap, load_engine


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_a_freed_block_stays_resident():
    if not cpu_heap.keep_heap():
        pytest.skip("not glibc: nothing to set")
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, above glibc's largest default mmap threshold (32 MB)
    with_block = rss_bytes()
    del block
    # glibc's default would munmap the block on free and the resident size would drop by 64 MB
    assert rss_bytes() > with_block - 16 * 1024 * 1024


def test_the_engine_keeps_the_heap_on_a_cpu(tiny_teacher):
    assert load_engine(str(tiny_teacher), prompt_cache_mb=0).keeps_heap == cpu_heap.keep_heap()
    assert not load_engine(str(tiny_teacher), prompt_cache_mb=0, cpu_keep_heap=False).keeps_heap
