"""offsite.host.memory: trimming hands a fragmented heap's free pages back to the OS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from offsite.host.memory import _glibc

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter (its heap state is known): raise glibc's dynamic mmap threshold by
# freeing one large block, fill the heap with 1 MiB tensors, free all but the last (which pins
# the heap's top, so glibc does not shrink it by itself), then trim.
SCRIPT = textwrap.dedent(
    """
    import torch
    from client.profile import rss_bytes
    from offsite.host.memory import trim_allocator

    large = torch.ones(4 << 20, dtype=torch.uint8)
    del large
    blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(200)]
    last = blocks[-1]
    del blocks
    before = rss_bytes()
    assert trim_allocator()
    print(before - rss_bytes())
    """
)


@pytest.mark.skipif(_glibc() is None, reason="malloc_trim is glibc's; other C libraries differ")
def test_trimming_returns_the_freed_heap_pages() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, cwd=ROOT
    )
    released = int(done.stdout.strip().splitlines()[-1])
    assert released > 150 * 2**20  # of the 199 MiB freed
