"""Dequantize-matmul for 4- and 8-bit integer weights with per-group scales and zero points (AWQ, GPTQ).

Both formats are repacked at load (exactly: the same codes, zero points and scales) into one layout the
kernels read along the inputs:
  qweight  int32   [N, K * bits / 32]  output row n's codes in chunks of CHUNK_WORDS words (CHUNK_WORDS * p
                                       inputs, p = 32 / bits): code j of the chunk's word w is its input
                                       j * CHUNK_WORDS + w ("planes": the j-th codes of a chunk's words are
                                       CHUNK_WORDS consecutive inputs, one vector load of x for all of them)
  zeros    uint8   [N, groups]         zero point codes
  scales   float16 [N, groups]
with w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] and y = x @ w.T (+ bias). GGUF's blocks
repack into the same words with float32 `scales` and `zeros` that hold each group's minimum instead:
w = q * scales - zeros ("min form", chosen by the zeros' dtype; exact for every GGUF block format).

Three paths by the number of rows M: one row, `_gemv_kernel` (batch-1 decode: each code is a few integer
instructions on the CUDA cores, the weight read once at close to the memory's speed); up to MM_MAX_ROWS,
`_mm_kernel`, a dot on the tensor cores with the weight's codes as its first operand (decode batches); beyond,
`_dequant_kernel` into a scratch weight for cuBLAS (prefill, where the pass over the weight is small beside the
GEMM). BENCHMARKS.md (runs 45-52, H100) has each path's times on the 7B's projections. `linear_reference` is
the torch code all paths are tested against, and what the CPU computes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from qwen_serve.kernels.pdl import launch_options, wait_for_previous
from qwen_serve.kernels.triton_or_none import tl, triton

MM_MAX_ROWS = 128
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: no inline PTX
CHUNK_WORDS = 4
# (ROWS, CHUNKS, warps) of `_gemv_kernel` by code width: the best single setting of run 49's sweep over the
# 7B's four projections (within 4% of each projection's own best).
GEMV_CONFIGS = {4: (8, 64, 2), 8: (4, 128, 4)}
# (BLOCK_N, CHUNKS, warps) of `_dequant_kernel`.
DEQUANT_TILES = (16, 8, 4)


def chunk_inputs(bits: int) -> int:
    """Inputs of one chunk of CHUNK_WORDS words: K and the group size of a packed layer are multiples of it."""
    return CHUNK_WORDS * 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes (K a multiple of `chunk_inputs`) -> int32 [N, K * bits / 32] in the planes layout."""
    per_word = 32 // bits
    n, k = codes.shape
    if k % chunk_inputs(bits):
        raise ValueError(f"{k} inputs do not fill chunks of {chunk_inputs(bits)} ({bits}-bit codes)")
    chunks = codes.to(torch.int64).reshape(n, k // chunk_inputs(bits), per_word, CHUNK_WORDS)  # [n, c, j, w]
    shifts = (torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits)[:, None]
    words = (chunks << shifts).sum(2).reshape(n, k // per_word)  # < 2**32: each code takes its own bits
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [N, K * bits / 32] in the planes layout -> int32 codes [N, K]."""
    n = qweight.shape[0]
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    codes = (qweight.reshape(n, -1, 1, CHUNK_WORDS) >> shifts[:, None]) & ((1 << bits) - 1)  # [n, c, j, w]
    return codes.reshape(n, -1)


def dequantize_reference(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                         bits: int) -> torch.Tensor:
    """The weight as float32 [N, K] (exact: a small integer times a float16, or GGUF's q * d*sc - dmin*m)."""
    q = unpack_codes(qweight, bits)
    s = scales.float().repeat_interleave(group_size, dim=1)
    if zeros.dtype.is_floating_point:  # min form
        return q.float() * s - zeros.float().repeat_interleave(group_size, dim=1)
    return (q - zeros.to(torch.int32).repeat_interleave(group_size, dim=1)).float() * s


def linear_reference(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int, bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype."""
    out = x @ dequantize_reference(qweight, zeros, scales, group_size, bits).to(x.dtype).t()
    return out if bias is None else out + bias


@triton.jit
def _code_to_float(moved, MASK: tl.constexpr, LOP3: tl.constexpr):
    """(moved & MASK) | 1.0's bits, as float32. LOP3: written as one PTX lop3, since ptxas makes two LOP3s of
    the plain form (4 instructions a code against 3 in the GEMV's SASS); Triton's interpreter runs the plain
    form."""
    if LOP3:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 1065353216, 0xEA;", "=r,r,n", [moved, MASK],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (moved & MASK) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, z_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_w, stride_g,
                 GROUP: tl.constexpr, BITS: tl.constexpr, MIN_FORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ROWS: tl.constexpr, CHUNKS: tl.constexpr, WB: tl.constexpr, EXACT: tl.constexpr,
                 LOP3: tl.constexpr, USE_PDL: tl.constexpr):
    """y[ROWS outputs] for one row x, CHUNKS chunks of WB words per step. A code q becomes the float32
    1 + q / 2**BITS exactly by moving it to the top of the mantissa and OR-ing in 1.0's exponent (no
    int-to-float conversion: a shift and one LOP3 a code, `_code_to_float`), so that per group
    sum_k w_k x_k = 2**BITS s * sum_k v_k x_k - (2**BITS s + z') * sum_k x_k, with z' = z * s (or GGUF's
    minimum). Every chunk lies in one group (the group size is a multiple of the chunk's inputs). EXACT
    (float32 x, what tests compare token for token) converts the codes instead: the two large sums above
    cancel to ~1e-6 of the result."""
    P: tl.constexpr = 32 // BITS
    CH: tl.constexpr = WB * P
    TOP: tl.constexpr = 23 - BITS  # the code's lowest bit at the top of a float32 mantissa
    MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
    CW: tl.constexpr = CHUNKS * WB
    rn = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n_ok = rn < N
    cols = tl.arange(0, CW)
    chunk = tl.arange(0, CHUNKS)
    n_chunks = K // CH
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    x_cols = (cols // WB) * CH + cols % WB  # input of code 0 of each word
    acc = tl.zeros((ROWS, CHUNKS), dtype=tl.float32)
    wait_for_previous(USE_PDL)
    for c0 in range(0, n_chunks, CHUNKS):
        col_ok = c0 * WB + cols < n_chunks * WB
        words = tl.load(w_rows + c0 * WB + cols[None, :], mask=n_ok[:, None] & col_ok[None, :], other=0)
        part = tl.zeros((ROWS, CW), dtype=tl.float32)
        x_sum = tl.zeros((CW,), dtype=tl.float32)
        for j in tl.static_range(P):
            xj = tl.load(x_ptr + c0 * CH + j * WB + x_cols, mask=col_ok, other=0.0).to(tl.float32)
            x_sum += xj
            if EXACT:
                v = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            elif j * BITS <= TOP:
                v = _code_to_float(words << (TOP - j * BITS), MASK, LOP3)
            else:
                v = _code_to_float(words >> (j * BITS - TOP), MASK, LOP3)
            part += v * xj[None, :]
        c_ok = c0 + chunk < n_chunks
        g = rn[:, None] * stride_g + ((c0 + chunk) * CH // GROUP)[None, :]
        ok = n_ok[:, None] & c_ok[None, :]
        s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)
        zs = z if MIN_FORM else z * s
        chunk_part = tl.sum(tl.reshape(part, (ROWS, CHUNKS, WB)), 2)
        chunk_x = tl.sum(tl.reshape(x_sum, (CHUNKS, WB)), 1)
        if EXACT:
            acc += s * chunk_part - zs * chunk_x[None, :]
        else:
            acc += (1 << BITS) * s * chunk_part - ((1 << BITS) * s + zs) * chunk_x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["M"])  # one variant for any rows of a tile size (warm_up.py)
def _mm_kernel(
    x_ptr, w_ptr, z_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_g, stride_y,
    GROUP: tl.constexpr, BITS: tl.constexpr, MIN_FORM: tl.constexpr, MAGIC: tl.constexpr, OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, WB: tl.constexpr, USE_PDL: tl.constexpr,
):
    """y.T [BLOCK_N, BLOCK_M] for BLOCK_N output rows: the weight is the dot's first operand, so that a
    decode batch of 1-16 rows fills the tensor cores' N side. Each span of inputs that lies in one group
    (GK of them) is one dot of the codes themselves, made exact in x's dtype by OR-ing them into the mantissa
    of OFFSET (MAGIC: its bits; no int-to-float conversion), then scaled once per output:
    sum_k w_k x_k = s * (dot(q + OFFSET, x) - OFFSET * sum x) - z' * sum x, with z' = z * s (or GGUF's
    minimum). The codes unpack in word order, so each span of x is reordered to meet them (GK spans whole
    chunks). SPLIT_K programs share a row block's inputs and add into a float32 output. float32 inputs
    multiply in full precision (PRECISION "ieee"), not TF32: they are what tests compare token for token."""
    P: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    GK: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    words = tl.arange(0, GK // P)
    ks = tl.arange(0, GK)
    shifts = tl.arange(0, P) * BITS
    per_split = tl.cdiv(K // BLOCK_K, SPLIT_K) * BLOCK_K
    k_start = tl.program_id(2) * per_split
    k_end = tl.minimum(k_start + per_split, K)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    wait_for_previous(USE_PDL)
    for k0 in range(k_start, k_end, BLOCK_K):
        for h in tl.static_range(BLOCK_K // GK):
            kb = k0 + h * GK
            packed = tl.load(w_rows + (kb // P + words)[None, :], mask=n_ok[:, None], other=0)  # [BN, GK / P]
            q = (packed[:, :, None] >> shifts[None, None, :]) & MASK  # [BN, GK / P, P]
            if MAGIC != 0:
                w = (q | MAGIC).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)  # OFFSET + q, exactly
            else:
                w = q.to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + rm[None, :] * stride_x + (kb + ks)[:, None], mask=m_ok[None, :], other=0.0)
            # input (chunk c, code j, word w) -> the codes' order (c, w, j)
            xt = tl.reshape(tl.permute(tl.reshape(xt, (GK // (P * WB), P, WB, BLOCK_M)), (0, 2, 1, 3)), (GK, BLOCK_M))
            part = tl.dot(tl.reshape(w, (BLOCK_N, GK)), xt, input_precision=PRECISION)  # [BN, BM]
            x_sum = tl.sum(xt.to(tl.float32), 0)  # [BM]
            g = rn * stride_g + kb // GROUP
            s = tl.load(s_ptr + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g, mask=n_ok, other=0).to(tl.float32)
            shift = s * OFFSET + z if MIN_FORM else s * (OFFSET + z)
            acc += part * s[:, None] - shift[:, None] * x_sum[None, :]
    out = y_ptr + rm[None, :] * stride_y + rn[:, None]
    ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok, sem="relaxed")


@triton.jit
def _dequant_kernel(w_ptr, z_ptr, s_ptr, out_ptr, N, K, stride_w, stride_g, stride_o,
                    GROUP: tl.constexpr, BITS: tl.constexpr, MIN_FORM: tl.constexpr, BLOCK_N: tl.constexpr,
                    CHUNKS: tl.constexpr, WB: tl.constexpr, USE_PDL: tl.constexpr):
    """[BLOCK_N, CHUNKS chunks] of the weight: the words read once (a chunk a thread), their codes put in
    input order in registers, one scale and zero point a chunk, whole rows stored."""
    P: tl.constexpr = 32 // BITS
    CH: tl.constexpr = WB * P
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k0 = tl.program_id(1) * CHUNKS * CH
    cols = tl.arange(0, CHUNKS * WB)
    wait_for_previous(USE_PDL)
    words = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_w + (k0 // P + cols)[None, :],
                    mask=n_ok[:, None] & (k0 // P + cols < K // P)[None, :], other=0)
    q = (words[:, :, None] >> (tl.arange(0, P) * BITS)[None, None, :]) & ((1 << BITS) - 1)  # [BN, c*WB + w, j]
    q = tl.permute(tl.reshape(q, (BLOCK_N, CHUNKS, WB, P)), (0, 1, 3, 2)).to(tl.float32)  # [BN, c, j, w]
    first = k0 + tl.arange(0, CHUNKS) * CH  # each chunk's first input
    g = rn[:, None] * stride_g + (first // GROUP)[None, :]
    g_ok = n_ok[:, None] & (first < K)[None, :]
    z = tl.load(z_ptr + g, mask=g_ok, other=0).to(tl.float32)[:, :, None, None]
    s = tl.load(s_ptr + g, mask=g_ok, other=0.0).to(tl.float32)[:, :, None, None]
    w = tl.reshape(q * s - z if MIN_FORM else (q - z) * s, (BLOCK_N, CHUNKS * CH))
    k = k0 + tl.arange(0, CHUNKS * CH)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_o + k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (k < K)[None, :])


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
               dtype: torch.dtype, tiles: tuple[int, int, int] = DEQUANT_TILES) -> torch.Tensor:
    """The weight [N, K] in `dtype`, one Triton pass (the values of `dequantize_reference`, rounded);
    `tiles`: (BLOCK_N, CHUNKS, warps). The group size is a multiple of the chunk's inputs."""
    n, k = qweight.shape[0], qweight.shape[1] * (32 // bits)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_n, chunks, warps = tiles
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, chunks * chunk_inputs(bits)))](
        qweight, zeros, scales, out, n, k, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BITS=bits, MIN_FORM=zeros.dtype.is_floating_point, BLOCK_N=block_n, CHUNKS=chunks,
        WB=CHUNK_WORDS, num_warps=warps, **launch_options(qweight.device))
    return out


def _magic(dtype: torch.dtype, bits: int) -> tuple[int, int]:
    """(the bits of OFFSET + 0 in `dtype`, OFFSET) such that OR-ing a code q < 2**bits into its mantissa gives
    OFFSET + q exactly; (0, 0) where `dtype` has too few mantissa bits (bfloat16 has 7: 8-bit codes convert)."""
    if dtype == torch.float16:
        return 0x6400, 1024  # 1024 + q for q < 1024
    if dtype == torch.bfloat16 and bits <= 7:
        return 0x4300, 128  # 128 + q for q < 128
    return 0, 0


def mm_config(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, SPLIT_K) for `_mm_kernel`, or None where its tiles do not divide
    the shape (K and the group size whole chunks, as `quant_linear` checks: then BLOCK_K is too). The inputs are split until ~1,200 programs (9 an H100 multiprocessor) are in flight: run 45's
    sweep on the 7B's projections, where one row of down_proj took 125 us unsplit, 52 in 4 and 44 in 8."""
    block_k = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
    if block_k is None or not (group % block_k == 0 or block_k % group == 0):
        return None
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 16 else 128
    tiles = -(-n // block_n) * -(-m // block_m)
    split = max(1, min(8, k // block_k, round(1200 / tiles)))
    return block_m, block_n, block_k, 4, split


def gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
         bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One row x [1, K] -> [1, N] in x's dtype through `_gemv_kernel` (the group size a multiple of
    `chunk_inputs`)."""
    n, k = qweight.shape[0], x.shape[1]
    rows, chunks, warps = GEMV_CONFIGS[bits]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, rows),)](
        x, qweight, zeros, scales, bias if bias is not None else scales, y, n, k, qweight.stride(0),
        scales.stride(0), GROUP=group_size, BITS=bits, MIN_FORM=zeros.dtype.is_floating_point,
        HAS_BIAS=bias is not None, ROWS=rows, CHUNKS=chunks, WB=CHUNK_WORDS, EXACT=x.dtype == torch.float32,
        LOP3=not _INTERPRETED, num_warps=warps, **launch_options(x.device))
    return y


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bits: int, bias: torch.Tensor | None = None,
                 config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) -> [M, N] in x's dtype, fp32 accumulation. One row `gemv`; up to
    MM_MAX_ROWS rows `_mm_kernel` (`config`, default `mm_config`'s, also sends one row to it); beyond, or
    where its tiles do not divide the shape, the weight is dequantized for cuBLAS."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(-1) != 1 or not (qweight.is_contiguous() and zeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("quant_linear needs contiguous rows and contiguous weights")
    if k % group_size or group_size % chunk_inputs(bits) or qweight.shape[1] * (32 // bits) != k:
        raise ValueError(f"group size {group_size} must divide K {k} and be a multiple of {chunk_inputs(bits)}, "
                         f"and the codes hold {k} inputs")
    if m == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1 and config is None:
        return gemv(x, qweight, zeros, scales, group_size, bits, bias)
    config = config or mm_config(m, n, k, group_size)
    if m > MM_MAX_ROWS or config is None:
        return F.linear(x, dequantize(qweight, zeros, scales, group_size, bits, x.dtype), bias)
    block_m, block_n, block_k, warps, split = config
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if split == 1 else torch.zeros(
        m, n, dtype=torch.float32, device=x.device)
    magic, offset = _magic(x.dtype, bits)
    _mm_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)](
        x, qweight, zeros, scales, bias if bias is not None else scales, y, m, n, k, x.stride(0),
        qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP=group_size, BITS=bits, MIN_FORM=zeros.dtype.is_floating_point, MAGIC=magic, OFFSET=offset,
        HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, WB=CHUNK_WORDS,
        num_warps=warps, **launch_options(x.device))
    if split == 1:
        return y
    return y.to(x.dtype) if bias is None else (y + bias).to(x.dtype)
