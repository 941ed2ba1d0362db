"""4-bit weights in torch's packed int4 layouts: on CUDA (sm80 and later) the layout of its int4 matmul
("tinygemm", `_convert_weight_to_int4pack`) with each output's words of a k-tile reordered, read by the Triton
kernels below; on the CPU `_weight_int4pack_mm_for_cpu`'s own.

The reorder (`pack`): torch's order holds input 32 j + 8 i + 2 b + h in nibble i + 4 h of an output's word
(b, j), with b fastest in x but j in memory; ours stores word (j, b), so that the words one thread reads and the
x pairs they meet (16 j + 4 i + b) are both contiguous and load as 16-byte vectors in one layout (BENCHMARKS.md
run 82: the one-row GEMV 7% faster). torch's own int4 matmul reads torch's order: `torchs_order` gives it back.

All compute w = (q - 8) * scale + zero per group of inputs, with scale and zero in the compute dtype, so an
AWQ/GPTQ zero point z becomes zero = (8 - z) * s and a GGUF minimum m becomes 8 * s - m. That rounding (a
bfloat16 scale keeps 8 of float16's 11 bits) makes the result differ from the exact weights by about what a
bfloat16 copy of them would (relative 2.4e-3 on a 4864 x 896 layer). The two devices take their codes in
different layouts; `pack` makes the one `linear` will read on the codes' device.

On CUDA three paths by the number of rows: one row (batch-1 decode) `gemv`, on the CUDA cores with PDL and the
bias fused (BENCHMARKS.md run 55: faster than tinygemm, which also waits for the GPU to drain before each
launch); 2 to MM_ROWS_MAX rows `mm`, on the tensor cores with the weights made bfloat16 in registers (runs 56
and 60, a 7B layer's four projections: 1.2x tinygemm's speed at 4 rows and 3.5x at 16, where tinygemm pays
per row; 1.8x dequantize + cuBLAS's at 256); beyond, prefill, the codes are dequantized into a scratch
bfloat16 weight for cuBLAS (`dequantize`, one Triton pass), small beside the GEMM. `layout_reference` and
`dequantize_reference` write the layout out in torch; the kernels are tested against them.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from qwen_serve.kernels.pdl import launch_options, wait_for_previous
from qwen_serve.kernels.triton_or_none import tl, triton

# Group sizes the packed int4 matmul takes (both devices).
GROUPS = (32, 64, 128, 256)
# CUDA's layout tiles K by INNER_K_TILES * 16 inputs; 8 is what the published int4 decoders use.
INNER_K_TILES = 8
# (k-tiles a program, warps) of the dequantize pass.
DEQUANT_TILES = (2, 4)
# (outputs, k-tiles a step, warps) of `gemv`, for layers of fewer inputs than GEMV_LONG_K and for the rest: the
# best of run 82's sweep on the 7B's projections, cold (one setting for qkv, o and gate_up together; down alone).
GEMV_TILES = {"short": (8, 16, 1), "long": (4, 32, 4)}
GEMV_LONG_K = 8192
# CUDA: 2 to this many rows `mm`, beyond it dequantize + cuBLAS.
MM_ROWS_MAX = 256
# `mm` on 129-256 rows: blocks of 256 rows for weights of at least this many codes (the 7B's gate_up and down
# in runs 56 and 60), of 128 for smaller ones (its qkv and o).
MM_WIDE_CODES = 20_000_000
# `mm`'s layers of at least this many inputs (the 7B's down): few outputs for their size, so wider output
# blocks and more of K split (run 60).
MM_LONG_K = 8192


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
                and hasattr(torch.ops.aten, "_convert_weight_to_int4pack"))
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and out_features % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


# Rows the CPU packer takes at a time: a multiple of its row blocks (slices packed apart and joined are the
# whole packed at once), and an lm_head of 152K rows then needs 16K rows of int32 codes, not 545 MB.
CPU_PACK_ROWS = 16384


def pack(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] in 0..15, zeros [N, groups] (zero point codes, or float minimums), scales [N, groups] ->
    (packed weight, scales_and_zeros [groups, N, 2] in `dtype`) on the codes' device."""
    if codes.is_cuda:  # two codes a byte, the even input in the high nibble
        codes = codes.to(torch.int32).contiguous()
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = _reorder(torch.ops.aten._convert_weight_to_int4pack(pairs, INNER_K_TILES))
    else:  # the CPU packer wants int32 codes: a slice of rows at a time keeps that copy small
        packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[start : start + CPU_PACK_ROWS].to(torch.int32).contiguous(), 1)
            for start in range(0, codes.shape[0], CPU_PACK_ROWS)])
    return packed, scales_and_zeros(zeros, scales, dtype)


def _reorder(packed: torch.Tensor) -> torch.Tensor:
    """torch's CUDA packing [N / 8, K / (16 T), 32, T / 2] -> ours, same shape: each output's words of a k-tile
    go from (b, j) to (j, b)."""
    n_tiles, k_tiles, _, words = packed.shape
    return packed.view(n_tiles, k_tiles, 8, 4, words).transpose(3, 4).contiguous().view(packed.shape)


def torchs_order(packed: torch.Tensor) -> torch.Tensor:
    """Our CUDA packing -> torch's (for its `_weight_int4pack_mm`): `_reorder` undone."""
    n_tiles, k_tiles, _, words = packed.shape
    return packed.view(n_tiles, k_tiles, 8, words, 4).transpose(3, 4).contiguous().view(packed.shape)


def scales_and_zeros(zeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """zeros [N, groups] (zero point codes, or float minimums), scales [N, groups] -> [groups, N, 2] in `dtype`:
    each group's scale and its zero = (8 - z) s (or 8 s - minimum)."""
    s = scales.float()
    zero = 8 * s - zeros.float() if zeros.dtype.is_floating_point else (8 - zeros.float()) * s
    return torch.stack([s.t(), zero.t()], dim=-1).to(dtype).contiguous()


def layout_reference(codes: torch.Tensor, inner_k_tiles: int = INNER_K_TILES) -> torch.Tensor:
    """codes [N, K] in 0..15 -> the CUDA packing int32 [N / 8, K / (16 T), 32, T / 2], T = inner_k_tiles, that
    `pack` makes (torch's `_convert_weight_to_int4pack`, then `_reorder`), written out (`dequantize_reference`
    undoes it)."""
    n, k = codes.shape
    words = inner_k_tiles // 2
    # [nt, a, kt, j, i, b, h] -> [nt, kt, a, j, b, h, i]
    nibbles = codes.to(torch.int64).reshape(n // 8, 8, k // (32 * words), words, 4, 4, 2).permute(0, 2, 1, 3, 5, 6, 4)
    nibbles = nibbles.reshape(n // 8, k // (32 * words), 32, words, 8)
    packed = (nibbles << torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)).sum(-1)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def dequantize_reference(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The CUDA packing [N / 8, K / (16 T), 32, T / 2] (T inner k-tiles) -> float32 weight [N, K].

    A tile of 8 outputs x 16 T inputs is 32 T / 2 words, output a's 4 T / 2 of them together; in torch's order
    (its matrix_to_m16n8k16_Bint4_layout, one warp's m16n8k16 B fragments) lane 4 a + b holds words j, and
    nibble s = i + 4 h of word j is input 32 j + 8 i + 2 b + h of the tile. Ours stores output a's words as
    (j, b): word 4 j + b of the output's."""
    n_tiles, k_tiles, _, words = packed.shape
    nibbles = (packed[..., None] >> torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)) & 0xF
    # [nt, kt, a, j, b, h, i] -> [nt, a, kt, j, i, b, h]
    codes = nibbles.reshape(n_tiles, k_tiles, 8, words, 4, 2, 4).permute(0, 2, 1, 3, 6, 4, 5)
    codes = codes.reshape(n_tiles * 8, k_tiles * words * 32)
    scale, zero = (t.float().t().repeat_interleave(group, dim=1) for t in scales_and_zeros.unbind(-1))
    return (codes.float() - 8) * scale + zero


@triton.jit
def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, WORDS: tl.constexpr, TILES: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """Outputs [8, TILES k-tiles] of one n-tile: the tiles' words read once as they lie, their nibbles put in
    `dequantize_reference`'s order in registers ([t, a, j, b, h, i] -> [a, t, j, i, b, h]), whole rows stored."""
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
    q = tl.permute(tl.reshape(q, (TILES, 8, WORDS, 4, 2, 4)), (1, 0, 2, 5, 3, 4))
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


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: no inline PTX


@triton.constexpr_function
def _field(s):
    """The lowest bit at which `gemv` reads nibble s of a word: 16 for even s, 12 for odd, each reached by a
    whole number of bytes (one shift serves two nibbles), and low enough in a float32 mantissa that
    2**(23 - field) + q times x keeps q x to 2**-16."""
    return 16 if s % 2 == 0 else 12


@triton.jit
def _nibble_as_float(words, S: tl.constexpr, LOP3: tl.constexpr):
    """Nibble S of each word as the float32 2**(23 - F) + q, F = _field(S): the code moved to bits F.. of the
    mantissa, whose bit F weighs 1 under the exponent 23 - F; one LOP3 masks the code and ors in the exponent.
    LOP3: written as PTX, since ptxas makes two LOP3s of the plain form; Triton's interpreter runs the plain form."""
    FIELD: tl.constexpr = _field(S)
    SHIFT: tl.constexpr = FIELD - 4 * S
    if SHIFT > 0:
        words = words << SHIFT
    elif SHIFT < 0:
        words = words >> -SHIFT
    MASK: tl.constexpr = 15 << FIELD
    EXPONENT: tl.constexpr = (127 + 23 - FIELD) << 23
    if LOP3:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,n,n", [words, MASK, EXPONENT],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (words & MASK) | EXPONENT
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bfloat16_halves(pairs):
    """int32 words holding two bfloat16 -> (the low one, the high one) as float32."""
    return (pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, N, K, GROUP: tl.constexpr, WORDS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr, LOP3: tl.constexpr,
                 USE_PDL: tl.constexpr):
    """y[ROWS outputs] for one row x, TILES k-tiles a step, from the packed codes as they lie (see
    `dequantize_reference`): an output's words of a k-tile are 4 * WORDS consecutive int32, word 4 j + b holding
    in nibble i + 4 h input 32 j + 8 i + 2 b + h of the tile. x and scales_and_zeros come as int32 views
    (bfloat16 pairs): x pair 16 j + 4 i + b holds the inputs of nibbles i and i + 4 of word (j, b), and one load
    gives a group's scale and zero.

    The tile is [j, b, k-tile, output]: a word's four b are contiguous in memory and so are the x pairs they meet,
    so both load as 16-byte vectors in the same layout, and each thread holds every output of its words, so x is
    loaded, converted and summed once for all of them. The four b of a j share a group: their sums are added
    before the scale. Per group, with v = o + q (`_nibble_as_float`, o = 2**(23 - field)) and
    w = (q - 8) s + zero: sum w x = s (sum v x - sum (o + 8) x) + zero sum x."""
    SPAN: tl.constexpr = 32 * WORDS  # inputs of a k-tile
    TW: tl.constexpr = 4 * WORDS  # an output's words of a k-tile
    k_tiles = K // SPAN
    rn = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n_ok = (rn < N)[None, None, None, :]
    j = tl.arange(0, WORDS)[:, None, None, None]
    b = tl.arange(0, 4)[None, :, None, None]
    kt = tl.arange(0, TILES)[None, None, :, None]
    row_words = (rn // 8).to(tl.int64) * k_tiles * 8 * TW + (rn % 8) * TW
    w_ptrs = w_ptr + (row_words[None, None, None, :] + kt * 8 * TW + 4 * j + b)
    x_ptrs = x_ptr + (kt * (SPAN // 2) + 16 * j + b)
    first = kt * SPAN + 32 * j  # the word's first input, in the step
    acc = tl.zeros((WORDS, 1, TILES, ROWS), dtype=tl.float32)
    wait_for_previous(USE_PDL)
    for t0 in range(0, k_tiles, TILES):
        kt_ok = t0 + kt < k_tiles
        words = tl.load(w_ptrs, mask=kt_ok & n_ok, other=0)
        part = tl.zeros((WORDS, 4, TILES, ROWS), dtype=tl.float32)
        x_even = tl.zeros((WORDS, 4, TILES, 1), dtype=tl.float32)  # x of the nibbles read at bit 16
        x_odd = tl.zeros((WORDS, 4, TILES, 1), dtype=tl.float32)  # and at bit 12
        for i in tl.static_range(4):
            low, high = _bfloat16_halves(tl.load(x_ptrs + 4 * i, mask=kt_ok, other=0))
            part += _nibble_as_float(words, i, LOP3) * low
            part += _nibble_as_float(words, i + 4, LOP3) * high
            if _field(i) == 16:
                x_even += low + high
            else:
                x_odd += low + high
        x_even = tl.sum(x_even, 1, keep_dims=True)
        x_odd = tl.sum(x_odd, 1, keep_dims=True)
        groups = (t0 * SPAN + first) // GROUP
        scale, zero = _bfloat16_halves(tl.load(sz_ptr + groups * N + rn[None, None, None, :], mask=kt_ok & n_ok,
                                               other=0))
        offsets = (2.0**(23 - _field(0)) + 8) * x_even + (2.0**(23 - _field(1)) + 8) * x_odd
        acc += scale * (tl.sum(part, 1, keep_dims=True) - offsets)
        acc += zero * (x_even + x_odd)
        w_ptrs += TILES * 8 * TW
        x_ptrs += TILES * (SPAN // 2)
    y = tl.sum(tl.sum(tl.sum(acc, 0), 0), 0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


def gemv(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
         bias: torch.Tensor | None, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One bfloat16 row x [1, K] (contiguous) -> [1, N] through `_gemv_kernel`; `tiles`: (outputs, k-tiles a
    step, warps), GEMV_TILES' by default."""
    n_tiles, k_tiles, _, words = packed.shape
    n, k = n_tiles * 8, k_tiles * words * 32
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    rows, per_step, warps = tiles or GEMV_TILES["long" if k >= GEMV_LONG_K else "short"]
    _gemv_kernel[(triton.cdiv(n, rows),)](
        x.view(torch.int32), packed, scales_and_zeros.view(torch.int32), bias if bias is not None else x, y, n, k,
        GROUP=group, WORDS=words, HAS_BIAS=bias is not None, ROWS=rows, TILES=per_step, LOP3=not _INTERPRETED,
        num_warps=warps, **launch_options(x.device))
    return y


@triton.jit
def _bfloat16_pair(pairs):
    """int32 words holding two bfloat16 -> (the low one, the high one) as bfloat16."""
    return pairs.to(tl.int16).to(tl.bfloat16, bitcast=True), (pairs >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _codes_as_bfloat16(words, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """An output's words of one k-tile [BLOCK_N, 4 * WORDS] -> its codes as bfloat16 128 + q [BLOCK_N, 32 * WORDS] in
    input order. Nibbles i and i + 4 of a word are inputs 2 apart (h = 0, 1), so one shift and one mask put both
    in a word as two bfloat16: q OR-ed into the mantissa of 128 (exact, no conversion). The word order
    (j, b, h, i) then permutes to the input order (j, i, b, h) in registers, so that x is used as it lies."""
    pairs = (words[:, :, None] >> (4 * tl.arange(0, 4))[None, None, :]) & 0x000F000F | 0x43004300  # [BN, w, i]
    low, high = _bfloat16_pair(pairs)
    v = tl.reshape(tl.join(low, high), (BLOCK_N, WORDS, 4, 4, 2))  # [n, j, b, i, h]
    return tl.reshape(tl.permute(v, (0, 1, 3, 2, 4)), (BLOCK_N, 32 * WORDS))


@triton.jit
def _weights(v, scale, zero, PACKED_BF16: tl.constexpr):
    """bfloat16 codes 128 + q -> the weights (q - 8) scale + zero in bfloat16, rounded once. PACKED_BF16: two
    at a time in bfloat16x2 PTX (q - 8 is exact; one fused multiply-add), else through float32."""
    if PACKED_BF16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, 0x43084308; sub.rn.bf16x2 t, $1, c; fma.rn.bf16x2 $0, t, $2, $3; }",
            "=r,r,r,r", [v, scale, zero], dtype=tl.bfloat16, is_pure=True, pack=2)
    return ((v.to(tl.float32) - 136.0) * scale.to(tl.float32) + zero.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _dot(a, b, acc, IN_FLOAT32: tl.constexpr):
    """tl.dot of bfloat16 operands; IN_FLOAT32 for Triton's interpreter, whose bfloat16 dot multiplies the raw
    bits."""
    if IN_FLOAT32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["M"])  # one variant for any rows of a tile size (warm_up.py)
def _mm_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y, GROUP: tl.constexpr,
               WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SPLIT: tl.constexpr, IN_FLOAT32: tl.constexpr, PACKED_BF16: tl.constexpr, USE_PDL: tl.constexpr):
    """y.T [BLOCK_N, BLOCK_M] from the packed codes as they lie, a k-tile (32 * WORDS inputs) a step, on the
    tensor cores with the weight as the dot's first operand (a decode batch is the narrow side). The codes
    become bfloat16 128 + q (`_codes_as_bfloat16`), then the weights (q - 8) s + zero (`_weights`, rounded once
    to bfloat16, as the dequantize pass does). SPLIT: the programs along the grid's third axis share an output
    block's k-tiles and add into a float32 y."""
    SPAN: tl.constexpr = 32 * WORDS
    TW: tl.constexpr = 4 * WORDS
    k_tiles = K // SPAN
    per_split = tl.cdiv(k_tiles, tl.num_programs(2))
    t_start = tl.program_id(2) * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    # outputs past the edge read the last one's codes, rows past it earlier rows' (modulo M), and are stored nowhere:
    # no masks in the loop. Read as the last row, as they once were, every program of a half-full row block sent the
    # same addresses to one L2 slice: a batch of 144-192 rows took 1.5-2.5x as long as one of 256 (runs 72, 80).
    rn_in = tl.minimum(rn, N - 1)
    rm_in = rm % M
    w = tl.arange(0, TW)
    row_words = (rn_in // 8).to(tl.int64) * k_tiles * 8 * TW + (rn_in % 8) * TW
    w_ptrs = w_ptr + row_words[:, None] + t_start * 8 * TW + w[None, :]
    x_ptrs = x_ptr + rm_in[None, :].to(tl.int64) * stride_x + t_start * SPAN + tl.arange(0, SPAN)[:, None]
    j = tl.arange(0, WORDS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    wait_for_previous(USE_PDL)
    for t in range(t_start, t_end):
        v = _codes_as_bfloat16(tl.load(w_ptrs), BLOCK_N, WORDS)
        xt = tl.load(x_ptrs)  # [SPAN, BM]
        groups = (t * SPAN + 32 * j) // GROUP  # each input's group is its word column j's
        scale, zero = _bfloat16_pair(tl.load(sz_ptr + groups[None, :] * N + rn_in[:, None]))  # [BN, WORDS] each
        v3 = tl.reshape(v, (BLOCK_N, WORDS, 32))
        wq = _weights(v3, tl.broadcast_to(scale[:, :, None], v3.shape), tl.broadcast_to(zero[:, :, None], v3.shape),
                      PACKED_BF16)
        acc = _dot(tl.reshape(wq, (BLOCK_N, SPAN)), xt, acc, IN_FLOAT32)
        w_ptrs += 8 * TW
        x_ptrs += SPAN
    out = y_ptr + rm[None, :] * stride_y + rn[:, None]
    n_ok = rn < N
    ok = n_ok[:, None] & (rm < M)[None, :]
    if SPLIT:
        tl.atomic_add(out, acc, mask=ok, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)


def mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
       bias: torch.Tensor | None, config: tuple[int, int, int, int]) -> torch.Tensor:
    """x [M, K] bfloat16 (contiguous) -> [M, N] through `_mm_kernel`; `config`: (BLOCK_M, BLOCK_N, warps,
    SPLIT_K)."""
    n_tiles, k_tiles, _, words = packed.shape
    n, k = n_tiles * 8, k_tiles * words * 32
    m = x.shape[0]
    block_m, block_n, warps, split = config
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if split == 1 else torch.zeros(
        m, n, dtype=torch.float32, device=x.device)
    _mm_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)](
        x, packed, scales_and_zeros.view(torch.int32), bias if bias is not None else x, y, m, n, k,
        x.stride(0), y.stride(0), GROUP=group, WORDS=words, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, SPLIT=split > 1, IN_FLOAT32=_INTERPRETED, PACKED_BF16=not _INTERPRETED,
        num_warps=warps, **launch_options(x.device))
    if split == 1:
        return y
    return y.to(x.dtype) if bias is None else (y + bias).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def mm_config(m: int, n: int, k: int, words: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, SPLIT_K) of `mm` for an [M, K] x [N, K] product, a rule fitted to run 60's
    sweep on the 7B's projections at 4-256 rows (a layer within 1.2% of each case's best setting at every row
    count): the rows' block; layers of fewer than MM_LONG_K inputs in blocks of 128 outputs, K split (in
    powers of two, up to 8) until 8 programs a multiprocessor are in flight, up to 8 rows, and in unsplit
    blocks of 64 beyond; longer layers (few outputs for their size) in blocks of 128 (8 warps from 128 rows),
    split until 2 programs a multiprocessor up to 64 rows and 1 beyond."""
    span = 32 * words
    block_m = next(b for b in (16, 32, 64, 128, 256) if m <= b or b == 256)
    if block_m == 256 and n * k < MM_WIDE_CODES:
        block_m = 128
    if k >= MM_LONG_K:
        block_n, warps, per_sm = 128, 8 if block_m >= 128 else 4, 2 if m <= 64 else 1
    else:
        block_n, warps, per_sm = (128, 4, 8) if m <= 8 else (64, 4, 0)
    tiles = -(-n // block_n) * -(-m // block_m)
    index = device.index if device.index is not None else torch.cuda.current_device()
    split = max(1, min(8, k // span, round(per_sm * _multiprocessors(index) / tiles)))
    return block_m, block_n, warps, 1 << (split.bit_length() - 1)


def linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (contiguous) -> [M, N]. CPU: 0.33 ms for 4864 x 896 at one row, 2 threads (160x the torch
    reference)."""
    if x.is_cuda and x.shape[0] == 1:
        return gemv(x, packed, group, scales_and_zeros, bias)
    if x.is_cuda and x.shape[0] > MM_ROWS_MAX:
        return F.linear(x, dequantize(packed, scales_and_zeros, group), bias)
    if x.is_cuda:
        n_tiles, k_tiles, _, words = packed.shape
        config = mm_config(x.shape[0], n_tiles * 8, k_tiles * words * 32, words, x.device)
        return mm(x, packed, group, scales_and_zeros, bias, config)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    return out if bias is None else out + bias
