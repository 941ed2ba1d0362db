"""Fused elementwise kernels for the decoder layer, each with its torch reference beside it.

Why they pay: at batch-1 decode the layer's matmuls read ~0.5 GB of weights in ~0.18 ms, and
every extra kernel costs ~2 us even inside a CUDA graph (less since they launch with programmatic
dependent launch on Hopper, kernels/pdl.py). The torch versions of RMSNorm + residual
(~8 kernels), RoPE (~15) and SwiGLU (2) add ~50 launches a layer; these replace them with 3.
Each kernel reproduces the reference's rounding points (where it casts to the model dtype), so
bf16 results match it to within one rounding step.

`gemv` is a batch-1 GEMV: at one token a projection is a pure weight read, and cuBLAS reads the
small decoder matrices (qkv, o_proj) at ~72% of the bandwidth (docs/gpu-notes.md); this kernel
reads each weight row block once with many small programs in flight. Other batch sizes use F.linear.

The layers call these for CUDA inputs when their fused kernels are on (layers/options.py); the torch
code each replaces stays in its layer (`layers.norm.rms_norm_reference`, `layers.activation.
silu_and_mul_reference`, `layers.rotary`) and is what the CPU path computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen_serve.kernels.kv_store import cache_format, to_cache
from qwen_serve.kernels.pdl import launch_options, wait_for_previous


# ----------------------------------------------------------------------------- RMSNorm + residual
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    wait_for_previous(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the sum is rounded, as in torch
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    h = (xf * inv_rms).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (h.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden] -> (weight * norm(x + residual), x + residual), one kernel."""
    n_rows, n_cols = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs a contiguous last dimension")
    out = torch.empty(n_rows, n_cols, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_kernel[(n_rows,)](
            x, residual if residual is not None else x, weight, out, res_out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
            n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            **launch_options(x.device),
        )
    return out, res_out


# ----------------------------------------------------------------------------- SwiGLU
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    wait_for_previous(USE_PDL)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)  # F.silu rounds to the dtype
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n_rows, width = x.shape
    if width % 2 or x.stride(-1) != 1:
        raise ValueError("silu_and_mul needs an even, contiguous last dimension (gate | up)")
    inter = width // 2
    out = torch.empty(n_rows, inter, dtype=x.dtype, device=x.device)
    if n_rows:
        block = 1024
        _silu_and_mul_kernel[(n_rows, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4, **launch_options(x.device)
        )
    return out


# ----------------------------------------------------------------------------- RoPE (+ KV write)
@triton.jit
def _rotate_heads(src_ptr, cos, sin, num_heads, HEADS_POW2: tl.constexpr, HALF: tl.constexpr):
    """Rotated halves (fp32) of one token's heads, with their offsets and mask: [HEADS_POW2, HALF] each."""
    heads = tl.arange(0, HEADS_POW2)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    offs = heads * (2 * HALF) + dims
    ok = heads < num_heads
    x1 = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + offs + HALF, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, offs, ok


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, table_ptr,
    stride_q, stride_k, stride_v, stride_table, stride_cb, stride_cs, num_q_heads, num_k_heads,
    Q_HEADS_POW2: tl.constexpr, K_HEADS_POW2: tl.constexpr, HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, WRITE_KV: tl.constexpr, CACHE_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr, USE_PDL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    wait_for_previous(USE_PDL)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos = tl.load(table_ptr + pos * stride_table + dims)  # [1, HALF] float32 (mscale folded in)
    sin = tl.load(table_ptr + pos * stride_table + HALF + dims)
    a, b, offs, ok = _rotate_heads(q_ptr + tok * stride_q, cos, sin, num_q_heads, Q_HEADS_POW2, HALF)
    dst = q_out_ptr + tok * num_q_heads * (2 * HALF)
    tl.store(dst + offs, a.to(q_out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + offs + HALF, b.to(q_out_ptr.dtype.element_ty), mask=ok)
    a, b, offs, ok = _rotate_heads(k_ptr + tok * stride_k, cos, sin, num_k_heads, K_HEADS_POW2, HALF)
    a = a.to(k_out_ptr.dtype.element_ty)  # rounded once, as the reference's rotated k is
    b = b.to(k_out_ptr.dtype.element_ty)
    dst = k_out_ptr + tok * num_k_heads * (2 * HALF)
    tl.store(dst + offs, a, mask=ok)
    tl.store(dst + offs + HALF, b, mask=ok)
    if WRITE_KV:
        # This token's rotated key and its value into its cache slot [block, offset, kv_head, dim].
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:
            cache = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + offs
            tl.store(k_cache_ptr + cache, to_cache(a, k_cache_ptr, CACHE_MAX, MANTISSA_BITS, MIN_EXPONENT), mask=ok)
            tl.store(k_cache_ptr + cache + HALF, to_cache(b, k_cache_ptr, CACHE_MAX, MANTISSA_BITS, MIN_EXPONENT), mask=ok)
            v1 = tl.load(v_ptr + tok * stride_v + offs, mask=ok)
            v2 = tl.load(v_ptr + tok * stride_v + offs + HALF, mask=ok)
            tl.store(v_cache_ptr + cache, to_cache(v1, v_cache_ptr, CACHE_MAX, MANTISSA_BITS, MIN_EXPONENT), mask=ok)
            tl.store(v_cache_ptr + cache + HALF, to_cache(v2, v_cache_ptr, CACHE_MAX, MANTISSA_BITS, MIN_EXPONENT), mask=ok)


def rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `layers.rotary.RotaryEmbedding.forward` computes on the CPU."""
    from qwen_serve.layers.rotary import _rotate

    cos, sin = table[positions].chunk(2, dim=-1)
    return _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)


def _launch_rotary(positions, q, k, table, head_dim, v=None, k_cache=None, v_cache=None, slot_mapping=None):
    n = q.shape[0]
    write = k_cache is not None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError("rotary needs contiguous rows and a power-of-two head_dim")
    if write and (v.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        raise ValueError("the KV write needs contiguous value rows and contiguous caches")
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    fmt = cache_format(k_cache if write else k)
    if n:
        hq, hk = q.shape[1] // head_dim, k.shape[1] // head_dim
        _rotary_kernel[(n,)](
            q, k, v if write else k, q_out, k_out, k_cache if write else k, v_cache if write else k,
            slot_mapping if write else positions, positions, table,
            q.stride(0), k.stride(0), v.stride(0) if write else 0, table.stride(0),
            k_cache.stride(0) if write else 0, k_cache.stride(1) if write else 0, hq, hk,
            Q_HEADS_POW2=triton.next_power_of_2(hq), K_HEADS_POW2=triton.next_power_of_2(hk), HALF=head_dim // 2,
            BLOCK_SIZE=k_cache.shape[1] if write else 1, WRITE_KV=write, CACHE_MAX=fmt.max,
            MANTISSA_BITS=fmt.mantissa_bits, MIN_EXPONENT=fmt.min_exponent,
            num_warps=4, **launch_options(q.device),
        )
    return q_out, k_out


def rotary(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, heads * head_dim], rows may be strided (a split of qkv)
    k: torch.Tensor,  # [num_tokens, kv_heads * head_dim]
    table: torch.Tensor,  # [max_positions, head_dim] float32: cos | sin
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k in one kernel; returns new contiguous tensors like `layers.rotary._rotate`.

    Positions are not range-checked here (that would need a host sync): the scheduler keeps them
    below max_model_len, which the table covers."""
    return _launch_rotary(positions, q, k, table, head_dim)


def rotary_and_write_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, head_dim: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary` plus the step's rotated keys and values into the paged cache, in the same kernel
    (the work of `layers.attention.write_kv_cache`, one launch fewer per layer)."""
    return _launch_rotary(positions, q, k, table, head_dim, v, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------- batch-1 GEMV
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, n_rows, n_cols, stride_w,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    # The first weight tile depends on no kernel: with PDL it is read while the previous kernel finishes.
    if EVEN_K:
        w = tl.load(w_ptrs, mask=row_ok[:, None])
    else:
        w = tl.load(w_ptrs, mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
    wait_for_previous(USE_PDL)
    x = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, n_cols, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=row_ok[:, None])
            x = tl.load(x_ptr + k0 + cols)
        else:
            ok = k0 + cols < n_cols
            w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & ok[None, :], other=0.0)
            x = tl.load(x_ptr + k0 + cols, mask=ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)  # [BLOCK_N] fp32
    if HAS_SCALE:  # float8 weights: each output row's scale, applied once after its dot product
        y *= tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


# Measured per shape on the H100 (scripts/bench_kernels.py, section gemv; docs/gpu-notes.md):
# (out_features, in_features) -> (BLOCK_N, BLOCK_K, num_warps).
# Qwen2.5-7B: qkv_proj, o_proj, gate_up_proj, down_proj, lm_head (run 5 of docs/gpu-runs).
GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (4608, 3584): (4, 512, 4),
    (3584, 3584): (8, 512, 8),
    (37888, 3584): (8, 512, 4),
    (3584, 18944): (4, 512, 4),
    (152064, 3584): (4, 512, 4),
}
# The same for float8 weights (the FP8 method's decode): the section's fp8 sweep, run 42 (H100).
FP8_GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (4608, 3584): (4, 512, 4),
    (3584, 3584): (4, 1024, 4),
    (37888, 3584): (2, 1024, 2),
    (3584, 18944): (4, 1024, 4),
}


def gemv_config(n_rows: int, n_cols: int, weight_bytes: int = 2) -> tuple[int, int, int]:
    """The measured config of a known shape; otherwise 4 rows x 512 columns per program, within 1%
    of the best config on every 7B shape (1-byte weights: 4 rows x 1024 columns, within 15%)."""
    if weight_bytes == 1:
        return FP8_GEMV_CONFIGS.get((n_rows, n_cols), (4, 1024, 4))
    return GEMV_CONFIGS.get((n_rows, n_cols), (4, 512, 4))


def gemv(
    x: torch.Tensor,  # [1, in_features]
    weight: torch.Tensor,  # [out_features, in_features], rows contiguous
    bias: torch.Tensor | None,
    config: tuple[int, int, int] | None = None,
    scale: torch.Tensor | None = None,  # float32 [out_features]: y = (x @ weight.T) * scale + bias
) -> torch.Tensor:
    """x @ weight.T + bias for one row, fp32 accumulation: [1, out_features]. The weight may be float8 with a
    scale per output row (the FP8 method's decode: a weight-only read, the activations stay in x's dtype)."""
    if x.shape[0] != 1 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("gemv takes one contiguous row and a row-major weight")
    n_rows, n_cols = weight.shape
    block_n, block_k, warps = config or gemv_config(n_rows, n_cols, weight.element_size())
    y = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, scale if scale is not None else x, bias if bias is not None else weight, y, n_rows, n_cols,
        weight.stride(0), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, EVEN_K=n_cols % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **launch_options(x.device),
    )
    return y


# ----------------------------------------------------------------------------- FP8 activations
@triton.jit
def _fp8_quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, static_ptr, stride_x, stride_o, n_cols, fp8_max, min_scale,
                              STATIC: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    wait_for_previous(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), 0) / fp8_max, min_scale)
    q = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
    tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)


def fp8_quantize_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.fp8.quantize_rows in one kernel (the reference takes ~8): [M, K] -> (float8 [M, K],
    float32 scales [M, 1])."""
    from qwen_serve.kernels import fp8

    n_rows, n_cols = x.shape
    if x.stride(-1) != 1:
        raise ValueError("fp8_quantize_rows needs a contiguous last dimension")
    out = torch.empty(n_rows, n_cols, dtype=fp8.FP8, device=x.device)
    scale = torch.empty(n_rows, 1, dtype=torch.float32, device=x.device)
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _fp8_quantize_rows_kernel[(n_rows,)](
            x, out, scale, static_scale if static_scale is not None else scale, x.stride(0), out.stride(0), n_cols,
            fp8.FP8_MAX, fp8.MIN_SCALE, STATIC=static_scale is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)), **launch_options(x.device),
        )
    return out, scale
