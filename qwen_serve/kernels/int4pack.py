"""4-bit weights through torch's packed int4 matmul ("tinygemm"): aten's `_weight_int4pack_mm` on CUDA
(tensor cores, sm80 and later) and `_weight_int4pack_mm_for_cpu` on the CPU.

Both compute w = (q - 8) * scale + zero per group of inputs, with scale and zero in the compute dtype, so an
AWQ/GPTQ zero point z becomes zero = (8 - z) * s and a GGUF minimum m becomes 8 * s - m. That rounding (a
bfloat16 scale keeps 8 of float16's 11 bits) makes the result differ from the exact weights by about what a
bfloat16 copy of them would (relative 2.4e-3 on a 4864 x 896 layer). The two devices take their codes in
different layouts; `pack` makes the one `linear` will read on the codes' device.

tinygemm pays per row (run 37: 39 us for the 7B's gate_up at one row, 150 at 16, 2.3 ms at 256), so on CUDA
more rows take `matmul`, a Triton tl.dot kernel that dequantizes each weight tile in registers, and prompts
of many rows dequantize the packed codes into a scratch bfloat16 weight for cuBLAS (`dequantize`, one pass).
`dequantize_reference` is the torch twin of both, the layout written out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen_serve.kernels.pdl import launch_options, wait_for_previous

# Group sizes the packed int4 matmul takes (both devices).
GROUPS = (32, 64, 128, 256)
# CUDA's layout tiles K by INNER_K_TILES * 16 inputs; 8 is what the published int4 decoders use.
INNER_K_TILES = 8
# CUDA: up to ROWS_MAX rows tinygemm, up to MATMUL_ROWS_MAX the tiled kernel that dequantizes in registers,
# beyond it dequantize + cuBLAS (a pass over the weight that many rows amortize).
ROWS_MAX = 16
MATMUL_ROWS_MAX = 256


def supported(group: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether 4-bit codes of a [out_features, in_features] layer in groups of `group` can run here in `dtype`.
    CUDA: bfloat16 only, compute capability 8.0+, outputs a multiple of 8 and inputs of INNER_K_TILES * 16.
    CPU: bfloat16 or float16 (its float32 path was ~30x slower than a bfloat16 matmul)."""
    if group not in GROUPS or in_features % group:
        return False
    if device.type == "cuda":
        return (dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
                and out_features % 8 == 0 and in_features % (INNER_K_TILES * 16) == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm"))
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def pack(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] in 0..15, zeros [N, groups] (zero point codes, or float minimums), scales [N, groups] ->
    (packed weight, scales_and_zeros [groups, N, 2] in `dtype`) on the codes' device."""
    s = scales.float()
    zero = 8 * s - zeros.float() if zeros.dtype.is_floating_point else (8 - zeros.float()) * s
    codes = codes.to(torch.int32).contiguous()
    if codes.is_cuda:  # two codes a byte, the even input in the high nibble
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, INNER_K_TILES)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, torch.stack([s.t(), zero.t()], dim=-1).to(dtype).contiguous()


def dequantize_reference(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """CUDA's packed codes [N / 8, K / (16 T), 32, T / 2] (T inner k-tiles) -> float32 weight [N, K].

    A tile of 8 outputs x 16 T inputs is one warp's m16n8k16 B fragments: lane t = 4 a + b holds output
    a's inputs, and nibble s = i + 4 h of its word j is input 32 j + 8 i + 2 b + h of the tile (torch's
    matrix_to_m16n8k16_Bint4_layout)."""
    n_tiles, k_tiles, _, words = packed.shape
    nibbles = (packed[..., None] >> torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)) & 0xF
    # [nt, kt, a, b, j, h, i] -> [nt, a, kt, j, i, b, h]
    codes = nibbles.reshape(n_tiles, k_tiles, 8, 4, words, 2, 4).permute(0, 2, 1, 4, 6, 3, 5)
    codes = codes.reshape(n_tiles * 8, k_tiles * words * 32)
    scale, zero = (t.float().t().repeat_interleave(group, dim=1) for t in scales_and_zeros.unbind(-1))
    return (codes.float() - 8) * scale + zero


@triton.jit
def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, WORDS: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Outputs [8, BLOCK_K] of one n-tile: each input's word and nibble as `dequantize_reference` lays
    them out (a word is read by the 8 inputs it holds; the stores are whole rows)."""
    SPAN: tl.constexpr = WORDS * 32  # inputs of one k-tile group
    a = tl.arange(0, 8)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.program_id(0) * 8 + a
    r = k % SPAN
    lane = 4 * a[:, None] + ((r // 2) % 4)[None, :]
    word = ((tl.program_id(0) * (K // SPAN) + k // SPAN)[None, :] * 32 + lane) * WORDS + (r // 32)[None, :]
    shift = 4 * ((r // 8) % 4 + 4 * (r % 2))
    ok = (k < K)[None, :]
    wait_for_previous(USE_PDL)
    q = (tl.load(w_ptr + word, mask=ok, other=0) >> shift[None, :]) & 0xF
    sz = sz_ptr + ((k // GROUP)[None, :] * N + n[:, None]) * 2
    scale = tl.load(sz, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(sz + 1, mask=ok, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - 8.0) * scale + zero
    tl.store(out_ptr + n[:, None].to(tl.int64) * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """CUDA's packed codes -> the weight [N, K] in the scales' dtype (`dequantize_reference`, rounded once)."""
    n_tiles, k_tiles, _, words = packed.shape
    n, k = n_tiles * 8, k_tiles * words * 32
    out = torch.empty(n, k, dtype=scales_and_zeros.dtype, device=packed.device)
    block_k = 512
    _dequant_kernel[(n_tiles, triton.cdiv(k, block_k))](
        packed, scales_and_zeros, out, n, k, GROUP=group, WORDS=words, BLOCK_K=block_k, num_warps=4,
        **launch_options(packed.device))
    return out


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, stride_x, stride_y, GROUP: tl.constexpr,
                   WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   FACTORED: tl.constexpr, USE_PDL: tl.constexpr):
    """y [BLOCK_M, BLOCK_N] = x @ w.T with w dequantized in registers, BLOCK_K inputs (one group, or one
    k-tile of SPAN inputs) a step.

    An output's words of one k-tile are 4 WORDS consecutive int32 (lane 4 a + b, word j at WORDS b + j), so
    a step reads [BLOCK_N, BLOCK_K / 8] words as pieces of whole rows. Its nibbles unpack in the order
    k' = 32 j + 8 b + s, which is input 32 j + 8 i + 2 b + h of the tile (s = i + 4 h, `dequantize_reference`):
    x's columns are gathered in that order instead of permuting the codes. A step lies in one group, so
    with FACTORED the codes go to the tensor cores as they are, OFFSET + code in x's dtype by setting the bits
    under OFFSET's exponent (no conversion instructions), and the scale and zero apply to the step's dot:
    sum_k x (OFFSET + q) s + sum_k x (z - (OFFSET + 8) s)."""
    SPAN: tl.constexpr = WORDS * 32
    JB: tl.constexpr = BLOCK_K // 32  # words j a step
    STEPS: tl.constexpr = SPAN // BLOCK_K  # steps a k-tile
    if x_ptr.dtype.element_ty == tl.bfloat16:
        MAGIC: tl.constexpr = 0x4300  # bfloat16 128 + code
        OFFSET: tl.constexpr = 128.0
    else:
        MAGIC: tl.constexpr = 0x6400  # float16 1024 + code
        OFFSET: tl.constexpr = 1024.0
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    rr = tl.arange(0, 4 * JB)  # 4 jj + b
    k_tiles = K // SPAN
    w_ptrs = (w_ptr + ((n // 8).to(tl.int64) * k_tiles * (32 * WORDS) + (n % 8) * (4 * WORDS))[:, None]
              + (WORDS * (rr % 4) + rr // 4)[None, :])
    kp = tl.arange(0, BLOCK_K)
    k_in = 32 * (kp // 32) + 8 * (kp % 4) + 2 * ((kp // 8) % 4) + (kp % 8) // 4
    x_ptrs = x_ptr + ms[:, None].to(tl.int64) * stride_x + k_in[None, :]
    m_ok = (ms < M)[:, None]
    shifts = 4 * tl.arange(0, 8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wait_for_previous(USE_PDL)
    for step in range(0, K // BLOCK_K):
        kt = step // STEPS
        words = tl.load(w_ptrs + kt * (32 * WORDS) + (step % STEPS) * JB, mask=n_ok[:, None], other=0)
        nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BN, 4 JB, 8]
        sz = sz_ptr + ((step * BLOCK_K // GROUP) * N + n) * 2
        scale = tl.load(sz, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=n_ok, other=0.0).to(tl.float32)
        xt = tl.load(x_ptrs + step * BLOCK_K, mask=m_ok, other=0.0)  # [BM, BK]
        if FACTORED:
            v = (nibbles | MAGIC).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
            d = tl.dot(xt, tl.trans(tl.reshape(v, (BLOCK_N, BLOCK_K))))
            xs = tl.sum(xt.to(tl.float32), axis=1)
            acc += d * scale[None, :] + xs[:, None] * (zero - (OFFSET + 8.0) * scale)[None, :]
        else:
            # code - 8 as float32 without a conversion: the code's bits under 2^23's exponent are 2^23 + code
            q = (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
            w = q * scale[:, None, None] + zero[:, None, None]
            acc = tl.dot(xt, tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)), acc)
    tl.store(y_ptr + ms[:, None].to(tl.int64) * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok & n_ok[None, :])


def matmul_config(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) for m rows."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    return block_m, 64, 4


FACTORED = True


def matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
           config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ the packed weight's transpose -> [M, N] in x's dtype, each weight tile
    dequantized in registers (the same values as `dequantize`, rounded to x's dtype once) for a tl.dot."""
    n_tiles, k_tiles, _, words = packed.shape
    n, k = n_tiles * 8, k_tiles * words * 32
    m = x.shape[0]
    if x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"int4 matmul takes contiguous rows of {k} inputs, got {tuple(x.shape)}")
    block_m, block_n, warps = config or matmul_config(m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _matmul_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        x, packed, scales_and_zeros, y, m, n, k, x.stride(0), y.stride(0), GROUP=group, WORDS=words,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(group, words * 32), FACTORED=FACTORED, num_warps=warps,
        **launch_options(x.device))
    return y


def linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (contiguous) -> [M, N]. CPU: 0.33 ms for 4864 x 896 at one row, 2 threads (160x the torch
    reference)."""
    if x.is_cuda and x.shape[0] > MATMUL_ROWS_MAX:
        return F.linear(x, dequantize(packed, scales_and_zeros, group), bias)
    if x.is_cuda and x.shape[0] > ROWS_MAX:
        out = matmul(x, packed, scales_and_zeros, group)
    elif x.is_cuda:
        out = torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    return out if bias is None else out + bias
