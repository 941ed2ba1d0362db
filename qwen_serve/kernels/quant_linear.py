"""Dequantize-matmul for 4- and 8-bit integer weights with per-group scales and zero points (AWQ, GPTQ).

Both formats are repacked at load (exactly: the same codes, zero points and scales) into one layout the
kernels read along the inputs, as the bfloat16 GEMV reads its weight rows:
  qweight  int32   [N, K * bits / 32]  output row n's codes, input k in bits bits*(k % p) of word k // p
  zeros    uint8   [N, groups]         zero point codes
  scales   float16 [N, groups]
with w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] and y = x @ w.T (+ bias). GGUF's blocks
repack into the same words with float32 `scales` and `zeros` that hold each group's minimum instead:
w = q * scales - zeros ("min form", chosen by the zeros' dtype; exact for every GGUF block format).

Two paths by the number of rows M: `_gemv_kernel` up to 4 rows (decode; a pure weight read, each program
reading a block of output rows over all inputs as packed words), and for more rows `_dequant_kernel` into a
scratch weight for cuBLAS. A tiled kernel with the dequantization inside its tl.dot loop is what batched
decode needs next: the first one read its words across rows (uncoalesced) and ran 10-100x slower than
cuBLAS (BENCHMARKS.md, run 32), so it is not used. `linear_reference` is the torch code both paths are
tested against, and what the CPU computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen_serve.kernels.pdl import launch_options, wait_for_previous

GEMV_MAX_ROWS = 4


def pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes -> int32 [N, K * bits / 32], input k in bits bits*(k % p) of word k // p."""
    per_word = 32 // bits
    n, k = codes.shape
    grouped = codes.to(torch.int64).reshape(n, k // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (grouped << shifts).sum(-1)  # < 2**32: each code takes its own bits
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_along_k(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [N, K * bits / 32] -> int32 codes [N, K]."""
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    return ((qweight[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(qweight.shape[0], -1)


def dequantize_reference(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                         bits: int) -> torch.Tensor:
    """The weight as float32 [N, K] (exact: a small integer times a float16, or GGUF's q * d*sc - dmin*m)."""
    q = unpack_along_k(qweight, bits)
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
def _gemv_kernel(
    x_ptr, w_ptr, z_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_g, stride_y,
    GROUP: tl.constexpr, BITS: tl.constexpr, MIN_FORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, USE_PDL: tl.constexpr,
):
    """y[m, n] for BLOCK_N output rows and every input, words [BLOCK_N, BLOCK_KW] at a time. A word's P codes
    share one group, so its part of the dot product is s * (sum_j q_j x_j) - z' * (sum_j x_j), with z' = z * s
    (or GGUF's minimum): per code one shift, mask, convert and multiply-add, and no reduction until the end
    (the elementwise partial sums stay in registers, [BLOCK_M, BLOCK_N, BLOCK_KW])."""
    P: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    words = tl.arange(0, BLOCK_KW)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)
    w_row = w_ptr + rows[:, None].to(tl.int64) * stride_w
    x_row = x_ptr + ms[:, None] * stride_x
    wait_for_previous(USE_PDL)
    for k0 in range(0, K // P, BLOCK_KW):
        kw = k0 + words  # [BLOCK_KW] word index along K
        kw_ok = kw < K // P
        ok = row_ok[:, None] & kw_ok[None, :]
        packed = tl.load(w_row + kw[None, :], mask=ok, other=0)  # [BN, BKW] int32
        zs_off = rows[:, None] * stride_g + ((kw * P) // GROUP)[None, :]  # each word lies in one group
        s = tl.load(s_ptr + zs_off, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + zs_off, mask=ok, other=0).to(tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)  # sum_j q_j x_j
        xs = tl.zeros((BLOCK_M, BLOCK_KW), dtype=tl.float32)  # sum_j x_j
        for j in tl.static_range(P):
            q = ((packed >> (j * BITS)) & MASK).to(tl.float32)  # [BN, BKW]
            xj = tl.load(x_row + (kw * P + j)[None, :], mask=m_ok[:, None] & kw_ok[None, :], other=0.0)
            xj = xj.to(tl.float32)  # [BM, BKW]
            t += q[None, :, :] * xj[:, None, :]
            xs += xj
        shift = z if MIN_FORM else z * s
        acc += s[None, :, :] * t - shift[None, :, :] * xs[:, None, :]
    y = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_y + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _dequant_kernel(w_ptr, z_ptr, s_ptr, out_ptr, N, K, stride_w, stride_g, stride_o,
                    GROUP: tl.constexpr, BITS: tl.constexpr, MIN_FORM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rn < N)[:, None] & (k < K)[None, :]
    wait_for_previous(USE_PDL)
    packed = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_w + (k // P)[None, :], mask=ok, other=0)
    q = ((packed >> ((k % P) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    zs_off = rn[:, None] * stride_g + (k // GROUP)[None, :]
    z = tl.load(z_ptr + zs_off, mask=ok, other=0).to(tl.float32)
    s = tl.load(s_ptr + zs_off, mask=ok, other=0.0).to(tl.float32)
    w = q * s - z if MIN_FORM else (q - z) * s
    tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_o + k[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, one Triton pass (the values of `dequantize_reference`, rounded)."""
    n, k = qweight.shape[0], qweight.shape[1] * (32 // bits)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_n, block_k = 16, 256
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, zeros, scales, out, n, k, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BITS=bits, MIN_FORM=zeros.dtype.is_floating_point, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, **launch_options(qweight.device))
    return out


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bits: int, bias: torch.Tensor | None = None,
                 gemv_config: tuple[int, int, int] = (8, 64, 4)) -> torch.Tensor:
    """x [M, K] (contiguous rows) -> [M, N] in x's dtype, fp32 accumulation. gemv_config: (BLOCK_N rows,
    BLOCK_KW words, warps), the best of run 32's sweep on the 7B shapes (4-8 rows, 32-128 words, 4 warps)."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(-1) != 1 or not (qweight.is_contiguous() and zeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("quant_linear needs contiguous rows and contiguous weights")
    if group_size % (32 // bits) or k % group_size:
        raise ValueError(f"group size {group_size} must divide K {k} and be a multiple of {32 // bits}")
    if m > GEMV_MAX_ROWS:
        return F.linear(x, dequantize(qweight, zeros, scales, group_size, bits, x.dtype), bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_n, block_kw, warps = gemv_config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, qweight, zeros, scales, bias if bias is not None else scales, y, m, n, k, x.stride(0),
        qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP=group_size, BITS=bits, MIN_FORM=zeros.dtype.is_floating_point, HAS_BIAS=bias is not None,
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=warps, **launch_options(x.device))
    return y
