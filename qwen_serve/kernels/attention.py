"""Triton attention over the paged KV cache: the GPU implementation of `AttentionBackend`.

Four kernels, each checked against the torch reference (`layers.attention.TorchAttentionBackend`,
`layers.attention.write_kv_cache`) in tests/gpu/test_kernels.py:

- `_write_kv_kernel` (reshape_and_cache): one program per token scatters its keys and values into
  their cache slot; slot < 0 (CUDA-graph padding) writes nothing. No host sync, unlike the reference.
- `_paged_attention_kernel`: one varlen kernel for mixed batches (prefill chunks over cached
  prefixes, and decodes). A program owns BLOCK_Q query tokens of one sequence and one KV head; the
  GQA group's query heads are stacked into the rows of one tile, so each key/value tile is read once
  per group (BLOCK_M = BLOCK_Q * heads_per_kv rows; 126 of 128 rows used at GQA 7). The program finds
  its sequence by a binary search over query_start_loc, so the grid depends only on num_tokens and
  num_seqs: fixed per CUDA-graph bucket. Causal within the chunk, online softmax in fp32 (exp2).
- Split-KV decode (flash-decoding): for decode-only batches (and verify steps of speculative decoding,
  whose short queries take one program per token too: AttentionMetadata.per_token_queries) with too few
  (sequence, kv head) pairs to fill the GPU, axis 2 of the grid splits each sequence's keys into
  NUM_SPLITS ranges whose partial outputs and log-sum-exps `_merge_splits_kernel` combines. The ranges
  are computed on the device from seq_lens (at least min_split_tiles tiles each; surplus splits exit at
  once), so one captured graph serves any context length.

- `_merge_two_kernel`: two attention results over disjoint keys, combined by their log-sum-exps
  (reference `merge_two_reference`), for the long chunks below.

Long prefill chunks (>= dense_prefill_min_len tokens) skip the kernel. In bfloat16 on Hopper, when the
`fa3-fwd` package (FlashAttention-3's forward; the `gpu` extra) loads, they go to FlashAttention-3: one call
over the sequence's keys gathered from the cache, its causal mask aligned bottom-right (10-14% less time
than cuDNN on the H200 for chunks of 8K-32K tokens, 37% at 4K; bench_kernels.py --sections fa3, run 26).
Otherwise they go to torch's cuDNN attention (on the chunk's tokens and the gathered prefix as they lie,
token-major), which the benchmark measured at 1.65x this kernel's rate; a chunk after a cached prefix is
two cuDNN calls (over the gathered prefix, and causal over itself) that `_merge_two_kernel` combines by
their log-sum-exps.

Everything reads the metadata's device tensors (query_start_loc_t, seq_lens_t, block_tables,
slot_mapping) and nothing calls .item(): decode is CUDA-graph capturable. The host values that pick
the launch shape (max_query_len == 1 or per_token_queries, num_tokens, num_seqs) are fixed per CUDA graph.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen_serve.kernels.kv_store import cache_format, to_cache
from qwen_serve.kernels.pdl import launch_options, wait_for_previous
from qwen_serve.layers.attention import AttentionMetadata, TorchAttentionBackend, gather_kv

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
    CACHE_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    wait_for_previous(USE_PDL)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS_POW2)
        dims = tl.arange(0, HEAD_DIM)
        ok = (heads < NUM_KV_HEADS)[:, None]
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads[:, None] * stride_ch + dims[None, :]
        k = tl.load(k_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=ok)
        v = tl.load(v_ptr + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=ok)
        tl.store(k_cache_ptr + dst, to_cache(k, k_cache_ptr, CACHE_MAX, MANTISSA_BITS, MIN_EXPONENT), mask=ok)
        tl.store(v_cache_ptr + dst, to_cache(v, v_cache_ptr, CACHE_MAX, MANTISSA_BITS, MIN_EXPONENT), mask=ok)


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr, PER_SEQ_PAD: tl.constexpr):
    """Last sequence whose first query block is <= q_block. Sequence i's blocks start at
    query_start_loc[i] // BLOCK_Q + i * PER_SEQ_PAD (the pad leaves room for a partial last block)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid * PER_SEQ_PAD
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, tile, kv_end, q_pos, table, k_cache_ptr, v_cache_ptr, kv_head, scale_log2,
    stride_cb, stride_cs, stride_ch, offs_d,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
):
    """One key/value tile of the online softmax; returns the updated (m_i, l_i, acc)."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_end
    # Each key's physical block: tiles may span several cache blocks (BLOCK_N != BLOCK_SIZE).
    if MASKED:
        blk = tl.load(table + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(table + offs_n // BLOCK_SIZE).to(tl.int64)
    kv_off = blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [BLOCK_N]
    if MASKED:
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :], other=0.0)  # [D, N]
    else:
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None])
    s = tl.dot(q, k.to(q.dtype)) * scale_log2  # [BLOCK_M, BLOCK_N], log2 domain; a float8 cache read in q's dtype
    if MASKED:
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)  # [N, D]
    else:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


# Triton compiles a variant per specialization of its int arguments (== 1, a multiple of 16); these vary
# from step to step (stride_bt is the step's block-table width), so specializing would compile variants
# while serving, seconds each.
@triton.jit(do_not_specialize=["num_seqs", "dense_min_len", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2, num_seqs, dense_min_len,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    NUM_HEADS: tl.constexpr, NUM_QPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PER_SEQ_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, USE_PDL: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    wait_for_previous(USE_PDL)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q, PER_SEQ_PAD)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq * PER_SEQ_PAD)
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # cached tokens before this step's chunk
    # Chunks of at least dense_min_len tokens are computed by the host's long-chunk path (FA3 or cuDNN) instead.
    if (local_block * BLOCK_Q < q_len) & (q_len < dense_min_len):
        # Row r of the tile is query token r // NUM_QPK of this block, query head r % NUM_QPK of the group.
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_idx = local_block * BLOCK_Q + offs_m // NUM_QPK  # [BLOCK_M] query index within the chunk
        head = kv_head * NUM_QPK + offs_m % NUM_QPK
        row_ok = (offs_m // NUM_QPK < BLOCK_Q) & (q_idx < q_len)
        q_tok = (q_start + q_idx).to(tl.int64)
        q = tl.load(
            q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        )  # [BLOCK_M, HEAD_DIM]
        q_pos = context_len + q_idx  # absolute position: row sees keys 0..q_pos

        # Keys this block needs end at its last valid query's position (causal).
        kv_end = context_len + tl.minimum((local_block + 1) * BLOCK_Q, q_len)
        num_tiles = tl.cdiv(kv_end, BLOCK_N)
        if NUM_SPLITS == 1:
            tile_lo = tl.full([], 0, tl.int32)
            tile_hi = num_tiles
        else:
            per_split = tl.maximum(tl.cdiv(num_tiles, NUM_SPLITS), MIN_SPLIT_TILES)
            tile_lo = split * per_split
            tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        # Tiles whose keys every row of the block sees (up to the first query's position) need no
        # mask; only the tiles on the causal diagonal (and the last partial tile) are masked.
        full_tiles = (context_len + local_block * BLOCK_Q + 1) // BLOCK_N
        for tile in range(tile_lo, tl.minimum(tile_hi, full_tiles)):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, kv_end, q_pos, table, k_cache_ptr, v_cache_ptr, kv_head, scale_log2,
                stride_cb, stride_cs, stride_ch, offs_d, BLOCK_N, BLOCK_SIZE, False,
            )
        for tile in range(tl.maximum(tile_lo, full_tiles), tile_hi):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, kv_end, q_pos, table, k_cache_ptr, v_cache_ptr, kv_head, scale_log2,
                stride_cb, stride_cs, stride_ch, offs_d, BLOCK_N, BLOCK_SIZE, True,
            )

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if NUM_SPLITS == 1:
            tl.store(
                out_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None],
            )
        else:
            # Partials [num_tokens, NUM_HEADS, NUM_SPLITS, HEAD_DIM] fp32, lse [num_tokens, NUM_HEADS, NUM_SPLITS];
            # an empty split writes out = 0 and lse = -inf, so the merge never reads unwritten memory.
            row = (q_tok * NUM_HEADS + head) * NUM_SPLITS + split
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
            tl.store(part_lse_ptr + row, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    wait_for_previous(USE_PDL)
    row = tok * NUM_HEADS + head
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # [SPLITS_POW2]; 0 for empty splits
    parts = tl.load(
        part_out_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0
    )
    denom = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[n, heads, D] -> [1, heads, n, D] as a view: cuDNN takes the token-major strides as they are."""
    return x.transpose(0, 1)[None]


def _cudnn_attention(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, H, n, D] queries over [1, KVH, m, D] keys and values through torch's cuDNN op, which takes
    the GQA group as it is (no expanded KV heads) and also returns the rows' natural-log log-sum-exp
    [1, H, n] (the public SDPA call does neither)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(out.shape[:3])


# n is the chunk's length, which varies from prompt to prompt (the strides are multiples of the padded row count).
@triton.jit(do_not_specialize=["n"])
def _merge_two_kernel(
    o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, n,
    stride_o1h, stride_o1t, stride_l1h, stride_o2h, stride_o2t, stride_l2h, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    wait_for_previous(USE_PDL)
    ok = rows < n
    offs_d = tl.arange(0, HEAD_DIM)
    l1 = tl.load(l1_ptr + head * stride_l1h + rows, mask=ok, other=0.0)
    l2 = tl.load(l2_ptr + head * stride_l2h + rows, mask=ok, other=0.0)
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    o1 = tl.load(o1_ptr + head * stride_o1h + rows[:, None] * stride_o1t + offs_d[None, :], mask=ok[:, None], other=0.0)
    o2 = tl.load(o2_ptr + head * stride_o2h + rows[:, None] * stride_o2t + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = (o1.to(tl.float32) * w1[:, None] + o2.to(tl.float32) * w2[:, None]) / (w1 + w2)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def merge_two_reference(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Two attention results over disjoint keys -> the result over all of them: outputs [1, H, n, D] with their
    natural-log log-sum-exps [1, H, n], weighted by exp(lse); returns [n, H, D] in o1's dtype."""
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]  # [1, H, n, 1]
    out = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
    return out[0].transpose(0, 1).to(o1.dtype)


def merge_two(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor, out: torch.Tensor) -> None:
    """`merge_two_reference` in one pass, written into out [n, H, D] (any strides but a contiguous last
    dimension): the torch version makes six float32 passes over [H, n, D] and a copy."""
    _, num_heads, n, head_dim = o1.shape
    if min(o1.stride(-1), o2.stride(-1), out.stride(-1), l1.stride(-1), l2.stride(-1)) != 1:
        raise ValueError("merge_two needs contiguous last dimensions")
    block_t = 32
    _merge_two_kernel[(triton.cdiv(n, block_t), num_heads)](
        o1, l1, o2, l2, out, n,
        o1.stride(1), o1.stride(2), l1.stride(1), o2.stride(1), o2.stride(2), l2.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=4, **launch_options(out.device),
    )


# torch's cuDNN attention op returned NaN for every float32 input on the H200 (run 17): float32 chunks stay in
# the kernel, whatever their length.
DENSE_DTYPES = (torch.float16, torch.bfloat16)
# What picks the long chunks' kernel (TritonAttentionBackend's long_chunk_kernel).
LONG_CHUNK_KERNELS = ("auto", "fa3", "cudnn")


def padded_rows(n: int) -> int:
    """The row count a long chunk's cuDNN calls use: n rounded up to one of 8-16 buckets per octave, each a
    multiple of 128. cuDNN builds a graph for every new shape (45-90 ms each on the H100, bench_kernels.py
    --sections plans), which every prompt of a new length would pay; with buckets, at most ~1/8 of the
    chunk's attention is spent on padding rows."""
    step = max(128, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _pad_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    """[n, heads, D] -> [m, heads, D] with zero rows after the real ones (x itself when m == n)."""
    return x if x.shape[0] == m else F.pad(x, (0, 0, 0, 0, 0, m - x.shape[0]))


def _dense_attention(
    q: torch.Tensor,  # [n, H, D] this chunk's queries
    k: torch.Tensor,  # [n, KVH, D] this chunk's keys and values
    v: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,  # cached keys, values before the chunk: [ctx, KVH, D]
    scale: float,
    out: torch.Tensor,  # [n, H, D], written
) -> None:
    """One long chunk through torch's cuDNN attention, KV heads as they are
    (bit-identical to expanded heads in scripts/bench_kernels.py section chunked; without the
    expansion's copies a 32K prompt in 8K chunks went from 1,152 to 1,116 ms). After a cached prefix,
    the chunk attends to the prefix (all visible) and to itself (causal) in two calls, merged by their
    log-sum-exps (`merge_two`). Rows are padded to `padded_rows`: a padding query's output is dropped,
    and padding keys come after every real query, so causality hides them."""
    n = q.shape[0]
    m = padded_rows(n)
    qt = _heads_first(_pad_rows(q, m))  # [1, H, m, D]
    o2, l2 = _cudnn_attention(qt, _heads_first(_pad_rows(k, m)), _heads_first(_pad_rows(v, m)), True, scale)
    o2, l2 = o2[:, :, :n], l2[:, :, :n]
    if prefix is None:
        out.copy_(o2[0].transpose(0, 1))
        return
    o1, l1 = _cudnn_attention(qt, _heads_first(prefix[0]), _heads_first(prefix[1]), False, scale)
    merge_two(o1[:, :, :n], l1[:, :, :n], o2, l2, out)


@functools.cache
def fa3_forward() -> Callable | None:
    """FlashAttention-3's `flash_attn_func` from the fa3-fwd wheel, or None where it is not installed or its
    extension does not load (it is built for a CUDA 13 torch; with a CPU or CUDA 12 torch the import fails)."""
    try:
        from fa3_fwd_interface import flash_attn_func
    except (ImportError, OSError, RuntimeError):
        return None
    return flash_attn_func


@functools.cache
def fa3_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether FlashAttention-3 can take this dtype on this device: bfloat16 (the wheel leaves float16 out) on a
    Hopper GPU (compute capability 9.x, where it was measured), with the wheel loaded. Cached: every layer of a
    long chunk asks."""
    return (dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and fa3_forward() is not None)


def _fa3_attention(
    q: torch.Tensor,  # [n, H, D] this chunk's queries (last dimension contiguous)
    k: torch.Tensor,  # [ctx + n, KVH, D] the sequence's keys and values up to the chunk's end
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor,  # [n, H, D], written
) -> None:
    """One long chunk through FlashAttention-3, KV heads as they are. Its causal mask is aligned bottom-right
    (query i sees keys up to ctx + i), so the cached prefix and the chunk are one call with no merge, and no
    row padding is needed (its kernels are compiled ahead for every length)."""
    out.copy_(fa3_forward()(q[None], k[None], v[None], softmax_scale=scale, causal=True)[0])


def warm_up_fa3(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """One small FlashAttention-3 call, so the first long prompt does not pay for loading its kernel."""
    q = torch.zeros(1024, num_heads, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(1024, num_kv_heads, head_dim, dtype=dtype, device=device)
    _fa3_attention(q, kv, kv, 1.0, torch.empty_like(q))


def warm_up_dense(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Runs each kind of cuDNN call the long chunks make once, on small tensors: the first call of a kind
    (causal or not; key count aligned or not) compiled for 0.6-1.2 s on the H100 (bench_kernels.py
    --sections plans), which would otherwise land on the first long prompt a server gets. Padded chunks
    make only aligned causal calls; prefixes (cached prompt lengths) may be unaligned."""
    q = torch.zeros(1, num_heads, 1024, head_dim, dtype=dtype, device=device)
    for causal, keys in ((True, 1024), (False, 1024), (False, 1040)):
        kv = torch.zeros(1, num_kv_heads, keys, head_dim, dtype=dtype, device=device)
        _cudnn_attention(q, kv, kv, causal, 1.0)


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = skip
) -> None:
    """Fused reshape_and_cache: the kernel version of `layers.attention.write_kv_cache`."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("write_kv_cache needs a contiguous last dimension and contiguous caches")
    fmt = cache_format(k_cache)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_KV_HEADS=num_kv_heads,
        HEADS_POW2=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, CACHE_MAX=fmt.max,
        MANTISSA_BITS=fmt.mantissa_bits, MIN_EXPONENT=fmt.min_exponent,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4, **launch_options(k.device),
    )


class TritonAttentionBackend:
    """Paged attention for mixed batches on CUDA (see the module docstring).

    num_splits: None picks the split count from the batch (flash-decoding only when the
    (sequence, kv head) pairs do not fill the GPU); an int forces it for decode batches (1 = off).
    The tile sizes are the measured defaults (docs/gpu-notes.md); they are arguments for benchmarks.
    Decode batches whose (sequence, kv head) pairs alone cover every SM read keys in tiles of
    wide_decode_block_n (fewer, larger loads per program), smaller ones in tiles of decode_block_n
    (more, shorter splits).

    CUDA graphs: the split count is chosen on the host from meta.max_seq_len when the graph is
    captured, so capture decode graphs with max_seq_len set to the longest context the graph will
    serve (e.g. max_model_len); the kernel reads the real lengths on the device at every replay.
    """

    MAX_SPLITS = 64

    def __init__(
        self,
        num_splits: int | None = None,
        decode_block_n: int = 64,
        wide_decode_block_n: int = 128,
        prefill_block_m: int = 128,
        prefill_block_n: int = 128,
        prefill_num_warps: int = 8,
        prefill_num_stages: int = 3,
        decode_num_stages: int = 3,
        decode_num_warps: int = 4,
        min_split_tiles: int = 1,
        dense_prefill_min_len: int | None = 1024,
        long_chunk_kernel: str = "auto",
    ) -> None:
        if num_splits is not None and not 1 <= num_splits <= 256:
            raise ValueError(f"num_splits must be in 1..256, got {num_splits}")
        if long_chunk_kernel not in LONG_CHUNK_KERNELS:
            raise ValueError(f"long_chunk_kernel must be one of {', '.join(LONG_CHUNK_KERNELS)}, "
                             f"got {long_chunk_kernel!r}")
        if long_chunk_kernel == "fa3" and fa3_forward() is None:
            raise ValueError("long_chunk_kernel='fa3' needs FlashAttention-3's forward: pip install 'qwen-serve[gpu]' "
                             "(the fa3-fwd wheel, built for a CUDA 13 torch)")
        # Long chunks: "auto" = FlashAttention-3 where `fa3_supported`, else cuDNN; "fa3" / "cudnn" force one
        # (a forced "fa3" still hands float16 and non-Hopper devices to cuDNN, which FA3 does not serve).
        self.long_chunk_kernel = long_chunk_kernel
        self.num_splits = num_splits
        # 128-wide at batches 64-256 of 100-2048-token contexts: 70-89% of the KV-read floor against
        # 64-82% for 64-wide tiles (scripts/bench_kernels.py --sections attnmix, docs/gpu-notes.md v10).
        self.decode_block_n, self.wide_decode_block_n = decode_block_n, wide_decode_block_n
        self.prefill_block_m, self.prefill_block_n = prefill_block_m, prefill_block_n
        self.prefill_num_warps, self.prefill_num_stages = prefill_num_warps, prefill_num_stages
        # 4 warps: 2 and 8 were slower at batches 64-256 on the H200 (bench_kernels.py --sections attnmix, run 22).
        self.decode_num_stages, self.decode_num_warps = decode_num_stages, decode_num_warps
        # At least this many key tiles per split, so short contexts use few splits (the rest exit early).
        self.min_split_tiles = min_split_tiles
        # A prefill chunk this long leaves this kernel for FlashAttention-3 or torch's cuDNN attention
        # (cuDNN measured 1.65x faster than the kernel at 4K-32K tokens, FA3 10-14% faster than cuDNN);
        # None keeps it here.
        self.dense_prefill_min_len = dense_prefill_min_len
        self._num_sms: dict[torch.device, int] = {}

    def _sms(self, device: torch.device) -> int:
        if device not in self._num_sms:
            # Off CUDA only Triton's interpreter runs this: assume an H100's 132 SMs.
            cuda = device.type == "cuda"
            self._num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 132
        return self._num_sms[device]

    def splits_for(self, device: torch.device, num_tokens: int, num_kv_heads: int, max_seq_len: int) -> int:
        """Split count for a decode batch: enough programs for ~2 waves of the GPU, never more
        splits than the longest context has min_split_tiles-tile ranges."""
        if self.num_splits is not None:
            return self.num_splits
        programs = num_tokens * num_kv_heads
        wanted = triton.cdiv(2 * self._sms(device), programs)
        useful = triton.cdiv(max_seq_len, self.min_split_tiles * self.decode_block_n)
        return max(1, min(wanted, useful, self.MAX_SPLITS))

    def decode_tile_for(self, device: torch.device, num_tokens: int, num_kv_heads: int) -> int:
        """Key-tile width of a decode batch: wide once its (sequence, kv head) pairs cover every SM."""
        return self.wide_decode_block_n if num_tokens * num_kv_heads >= self._sms(device) else self.decode_block_n

    def warm_up(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> None:
        """One-time work before serving: the first calls of the long-chunk path's kernels."""
        if self.uses_fa3(dtype, device):
            warm_up_fa3(num_heads, num_kv_heads, head_dim, dtype, device)
        elif self._dense_enabled(dtype):
            warm_up_dense(num_heads, num_kv_heads, head_dim, dtype, device)

    def uses_fa3(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether long chunks of this dtype go to FlashAttention-3 (rather than cuDNN) on this device."""
        return self._dense_enabled(dtype) and self.long_chunk_kernel != "cudnn" and fa3_supported(dtype, device)

    def _dense_enabled(self, dtype: torch.dtype) -> bool:
        """Whether long chunks of this dtype leave the kernel at all (half precision only, and not turned off)."""
        return self.dense_prefill_min_len is not None and dtype in DENSE_DTYPES

    def _dense_prefill_seqs(self, meta: AttentionMetadata, dtype: torch.dtype) -> list[int]:
        """Sequences whose chunk in this step is long enough for the long-chunk path (half-precision inputs only)."""
        if not self._dense_enabled(dtype):
            return []
        starts = meta.query_start_loc
        return [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] >= self.dense_prefill_min_len]

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
        if k_cache is None or meta.block_tables is None:
            # Plain prefill without a cache (tests, profiling): not a serving path.
            return TorchAttentionBackend._prefill_no_cache(q, k, v, meta, scale)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
        if q.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
            raise ValueError("attention needs q with a contiguous last dimension and contiguous caches")
        qpk = num_heads // num_kv_heads
        device = q.device
        qsl = meta.query_start_loc_t
        if qsl is None:  # eager callers only; a captured graph must bring device tensors
            qsl = torch.tensor(meta.query_start_loc, dtype=torch.int32, device=device)
        seq_lens = meta.seq_lens_t
        if seq_lens is None:
            seq_lens = torch.tensor(meta.seq_lens, dtype=torch.int32, device=device)
        num_seqs = meta.num_seqs
        out = torch.empty_like(q)
        if num_tokens == 0:
            return out

        if meta.max_query_len == 1 or meta.per_token_queries:
            # Decode (and verify steps): one query token per program, the GQA group's heads as the tile rows.
            block_m, block_q, pad = max(16, triton.next_power_of_2(qpk)), 1, 0
            block_n = self.decode_tile_for(device, num_tokens, num_kv_heads)
            dense = []
            splits = self.splits_for(device, num_tokens, num_kv_heads, meta.max_seq_len) if meta.split_kv else 1
            grid0, warps, stages = num_tokens, self.decode_num_warps, self.decode_num_stages
        else:
            block_m = max(self.prefill_block_m, triton.next_power_of_2(qpk))
            block_q, block_n, pad, splits = block_m // qpk, self.prefill_block_n, 1, 1
            dense = self._dense_prefill_seqs(meta, q.dtype)
            grid0 = num_tokens // block_q + num_seqs
            warps, stages = self.prefill_num_warps, self.prefill_num_stages
        if splits > 1:
            part_out = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=device)
            part_lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=device)
        else:
            part_out = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
        _paged_attention_kernel[(grid0, num_kv_heads, splits)](
            q, k_cache, v_cache, out, part_out, part_lse,
            meta.block_tables, qsl, seq_lens,
            scale * _LOG2E, num_seqs, self.dense_prefill_min_len if dense else 2**31 - 1,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            NUM_HEADS=num_heads, NUM_QPK=qpk, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, PER_SEQ_PAD=pad,
            NUM_SPLITS=splits, MIN_SPLIT_TILES=self.min_split_tiles,
            num_warps=warps, num_stages=stages, **launch_options(device),
        )
        fa3 = bool(dense) and self.uses_fa3(q.dtype, device)
        for i in dense:
            s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            ctx = meta.seq_lens[i] - (e - s)
            table = meta.block_tables[i]
            if fa3:
                # The chunk's keys are in the cache already (written before attention): gather them with the prefix.
                seq_k, seq_v = (k[s:e], v[s:e]) if ctx == 0 else (
                    gather_kv(k_cache, table, ctx + e - s).to(q.dtype), gather_kv(v_cache, table, ctx + e - s).to(q.dtype))
                _fa3_attention(q[s:e], seq_k, seq_v, scale, out[s:e])
                continue
            prefix = (gather_kv(k_cache, table, ctx).to(q.dtype), gather_kv(v_cache, table, ctx).to(q.dtype)) if ctx > 0 else None
            _dense_attention(q[s:e], k[s:e], v[s:e], prefix, scale, out[s:e])
        if splits > 1:
            _merge_splits_kernel[(num_tokens, num_heads)](
                part_out, part_lse, out, out.stride(0), out.stride(1),
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=splits,
                SPLITS_POW2=triton.next_power_of_2(splits), num_warps=4, **launch_options(device),
            )
        return out
