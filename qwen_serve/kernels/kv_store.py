"""Stores into the paged KV cache from Triton, in the cache's element type.

A float8 cache (`--kv-cache-dtype fp8`) holds the values unscaled: a cast saturates at the format's
largest finite value (448 for e4m3), as torch's casts in the reference `layers.attention.write_kv_cache`
do, rather than leaving it to the conversion instruction's handling of out-of-range values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen_serve.layers.attention import FLOAT8_DTYPES


def cache_max(cache: torch.Tensor) -> float:
    """The saturation bound `to_cache` takes: the float8 format's largest finite value, else 0 (none)."""
    return float(torch.finfo(cache.dtype).max) if cache.dtype in FLOAT8_DTYPES else 0.0


@triton.jit
def to_cache(x, cache_ptr, CACHE_MAX: tl.constexpr):
    """x in the element type of cache_ptr; clamped to +-CACHE_MAX first when CACHE_MAX > 0."""
    if CACHE_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -CACHE_MAX), CACHE_MAX)
    return x.to(cache_ptr.dtype.element_ty)
