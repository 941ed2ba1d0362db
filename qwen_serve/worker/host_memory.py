"""Gives the C heap's free pages back to the operating system once the model is loaded.

Loading dequantizes, repacks and copies weights through many temporaries; glibc's allocator keeps the
pages they freed in its arenas, so they stay in the process's resident memory (0.25 of the demo model's
1.77 GiB after loading on the CPU, BENCHMARKS.md). `malloc_trim(0)` returns them. Elsewhere than glibc
there is nothing to call, and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def trim_heap() -> bool:
    """Returns the heap's free pages to the OS; True when glibc gave any back."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return False
    return bool(trim(0)) if trim is not None else False
