"""4-bit weights through torch's packed int4 matmul ("tinygemm"): aten's `_weight_int4pack_mm` on CUDA
(tensor cores, sm80 and later) and `_weight_int4pack_mm_for_cpu` on the CPU.

Both compute w = (q - 8) * scale + zero per group of inputs, with scale and zero in the compute dtype, so an
AWQ/GPTQ zero point z becomes zero = (8 - z) * s and a GGUF minimum m becomes 8 * s - m. That rounding (a
bfloat16 scale keeps 8 of float16's 11 bits) makes the result differ from the exact weights by about what a
bfloat16 copy of them would (relative 2.4e-3 on a 4864 x 896 layer). The two devices take their codes in
different layouts; `pack` makes the one `linear` will read on the codes' device.

tinygemm pays per row (run 37: 39 us for the 7B's gate_up at one row, 150 at 16, 2.3 ms at 256), so on CUDA
more than ROWS_MAX rows dequantize the packed codes into a scratch bfloat16 weight for cuBLAS instead
(`dequantize`, one Triton pass; `dequantize_reference` is its torch twin, the layout written out).
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
# CUDA: up to this many rows tinygemm, beyond it dequantize + cuBLAS (the crossover of run 37's per-op times).
ROWS_MAX = 16
# (k-tiles a program, warps) of the dequantize pass.
DEQUANT_TILES = (2, 4)


def supported(group: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether 4-bit codes of a [out_features, in_features] layer in groups of `group` can run here in `dtype`.
    CUDA: bfloat16 only, compute capability 8.0+, outputs a multiple of 8 and inputs of INNER_K_TILES * 16.
    CPU: bfloat16 or float16 (its float32 path was ~30x slower than a bfloat16 matmul), outputs a multiple of
    16 (its packing's refusal otherwise)."""
    if group not in GROUPS or in_features % group:
        return False
    if device.type == "cuda":
        return (dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
                and out_features % 8 == 0 and in_features % (INNER_K_TILES * 16) == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm"))
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and out_features % 16 == 0
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
def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, WORDS: tl.constexpr, TILES: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """Outputs [8, TILES k-tiles] of one n-tile: the tiles' words read once as they lie, their nibbles put in
    `dequantize_reference`'s order in registers ([t, a, b, j, h, i] -> [a, t, j, i, b, h]), whole rows stored."""
    SPAN: tl.constexpr = WORDS * 32  # inputs of one k-tile
    KB: tl.constexpr = TILES * SPAN
    GK: tl.constexpr = GROUP if GROUP < KB else KB  # inputs that share a scale within the program's span
    k_tiles = K // SPAN
    kt = tl.program_id(1) * TILES + tl.arange(0, TILES)
    lane = tl.arange(0, 32)
    words = ((tl.program_id(0) * k_tiles + kt)[:, None, None] * 32 + lane[None, :, None]) * WORDS + tl.arange(
        0, WORDS)[None, None, :]
    wait_for_previous(USE_PDL)
    packed = tl.load(w_ptr + words, mask=(kt < k_tiles)[:, None, None], other=0)  # [t, lane, j]
    q = (packed[:, :, :, None] >> (4 * tl.arange(0, 8))[None, None, None, :]) & 0xF  # [t, lane, j, nibble]
    q = tl.permute(tl.reshape(q, (TILES, 8, 4, WORDS, 2, 4)), (1, 0, 3, 5, 2, 4))
    q = tl.reshape(q, (8, KB // GK, GK)).to(tl.float32)
    n = tl.program_id(0) * 8 + tl.arange(0, 8)
    first = tl.program_id(1) * KB + tl.arange(0, KB // GK) * GK
    sz = sz_ptr + ((first // GROUP)[None, :] * N + n[:, None]) * 2
    scale = tl.load(sz, mask=(first < K)[None, :], other=0.0).to(tl.float32)[:, :, None]
    zero = tl.load(sz + 1, mask=(first < K)[None, :], other=0.0).to(tl.float32)[:, :, None]
    w = tl.reshape((q - 8.0) * scale + zero, (8, KB))
    k = tl.program_id(1) * KB + tl.arange(0, KB)
    tl.store(out_ptr + n[:, None].to(tl.int64) * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=(k < K)[None, :])


def dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
               tiles: tuple[int, int] = DEQUANT_TILES) -> torch.Tensor:
    """CUDA's packed codes -> the weight [N, K] in the scales' dtype (`dequantize_reference`, rounded once);
    `tiles`: (k-tiles a program, warps)."""
    n_tiles, k_tiles, _, words = packed.shape
    n, k = n_tiles * 8, k_tiles * words * 32
    out = torch.empty(n, k, dtype=scales_and_zeros.dtype, device=packed.device)
    per_program, warps = tiles
    _dequant_kernel[(n_tiles, triton.cdiv(k_tiles, per_program))](
        packed, scales_and_zeros, out, n, k, GROUP=group, WORDS=words, TILES=per_program, num_warps=warps,
        **launch_options(packed.device))
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (contiguous) -> [M, N]. CPU: 0.33 ms for 4864 x 896 at one row, 2 threads (160x the torch
    reference)."""
    if x.is_cuda and x.shape[0] > ROWS_MAX:
        return F.linear(x, dequantize(packed, scales_and_zeros, group), bias)
    if x.is_cuda:
        out = torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    return out if bias is None else out + bias
