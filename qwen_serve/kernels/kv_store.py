"""Stores into the paged KV cache from Triton, in the cache's element type.

A float8 cache (`--kv-cache-dtype fp8`) holds the values unscaled: they saturate at the format's largest
finite value (448 for e4m3) and round to nearest, ties to even, as the reference
`layers.attention.write_kv_cache` does. The rounding is done here, onto the float8 grid in float32, so that the
final conversion is exact whatever rounding Triton's lowering applies (on an H100 it matched torch's cast on
every bfloat16 value, run 44; the e4m3 writes that differed from the reference in the last bit, runs 41 and
44, were saturated keys, 448 here against the NaN of torch 2.11's CUDA cast, which the reference now clamps).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


# 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 to an integer, ties to even. A tl.constexpr: the GPU
# compiler refuses plain globals inside kernels (the interpreter does not).
_RNE_MAGIC = tl.constexpr(12582912.0)


class CacheFormat(NamedTuple):
    """What `to_cache` needs of the cache's element type (all 0 for a cache in the model's dtype)."""

    max: float  # largest finite value; 0: no float8 rounding
    mantissa_bits: int
    min_exponent: int  # of the smallest normal value


_FLOAT8_FORMATS = {torch.float8_e4m3fn: CacheFormat(448.0, 3, -6), torch.float8_e5m2: CacheFormat(57344.0, 2, -14)}


def cache_format(cache: torch.Tensor) -> CacheFormat:
    return _FLOAT8_FORMATS.get(cache.dtype, CacheFormat(0.0, 0, 0))


@triton.jit
def round_to_float8_grid(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """float32 x (within the format's range) -> the nearest float8 value (ties to even), still in float32."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = tl.maximum(exponent, MIN_EXPONENT) - MANTISSA_BITS  # log2 of the grid's spacing around x
    inv_step = ((127 - step) << 23).to(tl.float32, bitcast=True)
    step_size = ((127 + step) << 23).to(tl.float32, bitcast=True)
    units = (x * inv_step + _RNE_MAGIC) - _RNE_MAGIC  # powers of two: only the add rounds
    rounded = units * step_size
    return tl.where(rounded == 0.0, x * 0.0, rounded)  # what rounds to zero keeps its sign, as torch's cast


@triton.jit
def to_cache(x, cache_ptr, CACHE_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """x in the element type of cache_ptr; a float8 cache (CACHE_MAX > 0) gets it saturated and rounded first."""
    if CACHE_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -CACHE_MAX), CACHE_MAX)
        x = round_to_float8_grid(x, MANTISSA_BITS, MIN_EXPONENT)
    return x.to(cache_ptr.dtype.element_ty)
