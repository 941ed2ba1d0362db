"""Triton kernels against their torch references, on fresh random inputs of many shapes.

Runs on a CUDA GPU (marked `gpu`: skipped without one). With Triton installed, the same tests
run on the CPU through Triton's interpreter, which is how the kernels were checked before a GPU was
at hand: `TRITON_INTERPRET=1 pytest --noconftest tests/gpu/test_kernels.py` (the conftest skips
everything under tests/gpu without CUDA; the bf16 cases and the whole-model test need the GPU).
Triton 3.6's interpreter needs numpy < 2 (with numpy 2.x most cases fail inside the interpreter
with "only 0-dimensional arrays can be converted to Python scalars"): e.g. `pip install --target
/tmp/np1 numpy==1.26.4 triton==3.6.0` and `PYTHONPATH=/tmp/np1` (66 passed, 4 skipped, 84 s on
2 cores). References run on the CPU in float32 from the same inputs; the error measure is
||out - ref|| / ||ref||, and outputs are poisoned (NaN) before each run, so an element the kernel
never writes fails the test.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from qwen_serve.kernels import fused  # noqa: E402
from qwen_serve.kernels.attention import (  # noqa: E402
    TritonAttentionBackend, fa3_forward, fa3_supported, merge_two, merge_two_reference, padded_rows, write_kv_cache,
)
from qwen_serve.kernels.kv_store import cache_format, round_to_float8_grid  # noqa: E402
from qwen_serve.kernels.random_batch import random_paged_batch  # noqa: E402
from qwen_serve.layers import attention as ref_attention  # noqa: E402
from qwen_serve.layers.activation import silu_and_mul_reference  # noqa: E402
from qwen_serve.layers.norm import rms_norm_reference  # noqa: E402
from qwen_serve.layers.rotary import RotaryEmbedding  # noqa: E402
from qwen_serve.models.config import RopeScaling  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [] if INTERPRETED else [pytest.mark.gpu]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter runs numpy, which has no bfloat16 matmul: it checks the logic in float16.
DTYPES = [torch.float16] if INTERPRETED else [torch.bfloat16, torch.float16]
# ||out - ref|| / ||ref|| bounds: bf16 operands land between 1e-3 and 1e-2, fp16 ~8x tighter.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert not torch.isnan(out).any(), "NaN in output (an element was never written?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator() -> None:
    """Fill freed device memory with NaN so outputs from torch.empty start poisoned."""
    if DEVICE == "cuda":
        torch.empty(64 << 20, dtype=torch.float32, device=DEVICE).fill_(float("nan"))
        torch.cuda.synchronize()


def reference_attention(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU float32 oracle: reference cache write, then TorchAttentionBackend. Returns (out, k_cache, v_cache)."""
    meta = batch.meta
    kc, vc = batch.k_cache.cpu().clone(), batch.v_cache.cpu().clone()
    ref_attention.write_kv_cache(batch.k.cpu(), batch.v.cpu(), kc, vc, meta.slot_mapping.cpu())
    cpu_meta = ref_attention.AttentionMetadata(
        meta.query_start_loc, meta.seq_lens, meta.slot_mapping.cpu(), meta.block_tables.cpu(),
        meta.max_query_len, max(meta.seq_lens),
    )
    out = ref_attention.TorchAttentionBackend().forward(
        batch.q.cpu().float(), batch.k.cpu().float(), batch.v.cpu().float(), kc.float(), vc.float(), cpu_meta, batch.scale
    )
    return out, kc, vc


# (context, new tokens) per sequence
DECODE = [(0, 1), (16, 1), (99, 1), (300, 1), (31, 1)]
PREFILL = [(0, 1), (0, 5), (0, 37), (0, 130)]
MIXED = [(50, 20), (0, 33), (200, 1), (31, 1), (17, 64), (0, 1)]
GQA = [(4, 4), (8, 4), (14, 2)]  # (heads, kv heads): ratios 1, 2, 7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("specs", [DECODE, PREFILL, MIXED], ids=["decode", "prefill", "mixed"])
def test_paged_attention_matches_reference(specs, heads, kv_heads, block_size, dtype):
    batch = random_paged_batch(specs, heads, kv_heads, 128, block_size, dtype, DEVICE, seed=len(specs) * block_size + heads)
    ref_out, ref_kc, ref_vc = reference_attention(batch)
    poison_allocator()
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    assert torch.equal(batch.k_cache.cpu(), ref_kc) and torch.equal(batch.v_cache.cpu(), ref_vc)
    out = TritonAttentionBackend().forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[dtype]


def long_chunk_kernels() -> list:
    """cuDNN always; FlashAttention-3 as a case skipped where it cannot run (no fa3-fwd, not Hopper)."""
    fa3_ok = DEVICE == "cuda" and fa3_supported(torch.bfloat16, torch.device(DEVICE))
    return ["cudnn", pytest.param("fa3", marks=pytest.mark.skipif(not fa3_ok, reason="needs fa3-fwd on Hopper"))]


@pytest.mark.skipif(DEVICE != "cuda", reason="torch's cuDNN attention needs the GPU")
@pytest.mark.parametrize("kernel", long_chunk_kernels())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(28, 4), (8, 8)])
def test_dense_prefill_path_matches_reference(heads, kv_heads, dtype, kernel):
    # Chunks >= 64 tokens take the long-chunk path (cuDNN: fresh, or after a cached prefix two calls merged by
    # log-sum-exp; FlashAttention-3 for bfloat16: one call over the gathered sequence); the short chunk, the
    # short prompt and the decode stay in the kernel.
    specs = [(0, 300), (40, 100), (0, 20), (77, 1), (0, 64), (500, 200), (33, 63)]
    batch = random_paged_batch(specs, heads, kv_heads, 128, 16, dtype, DEVICE, seed=heads)
    ref_out, _, _ = reference_attention(batch)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    poison_allocator()
    backend = TritonAttentionBackend(dense_prefill_min_len=64, long_chunk_kernel=kernel)
    assert backend.uses_fa3(dtype, torch.device(DEVICE)) == (kernel == "fa3" and dtype == torch.bfloat16)
    assert backend._dense_prefill_seqs(batch.meta, dtype) == [0, 1, 4, 5]
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.skipif(DEVICE != "cuda", reason="torch's cuDNN attention needs the GPU")
def test_float32_long_chunks_stay_in_the_kernel():
    """cuDNN's attention op gave NaN for float32 inputs: float32 chunks of any length take the kernel (whose
    prefill tiles fit shared memory in float32 at small head sizes, as the tiny test models have)."""
    specs = [(0, 300), (40, 100), (77, 1)]
    batch = random_paged_batch(specs, 8, 2, 32, 16, torch.float32, DEVICE, seed=3)
    ref_out, _, _ = reference_attention(batch)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    poison_allocator()
    backend = TritonAttentionBackend(dense_prefill_min_len=64)
    assert backend._dense_prefill_seqs(batch.meta, torch.float32) == []
    backend.warm_up(8, 2, 32, torch.float32, torch.device(DEVICE))  # no cuDNN call for float32
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert rel_err(out, ref_out) < 3e-3  # the kernel's float32 dots run on the tensor cores in tf32


@pytest.mark.skipif(DEVICE != "cuda" or not fa3_supported(torch.bfloat16, torch.device(DEVICE)),
                    reason="needs fa3-fwd on Hopper")
@pytest.mark.parametrize("specs", [[(0, 1500)], [(0, 700), (900, 1100), (5, 1)], [(2000, 3000)]])
def test_fa3_long_chunks_from_the_projection_views(specs):
    """As the model calls it: q, k and v are strided views of one qkv projection output (token stride
    (H + 2 KVH) D), prefixes not block-aligned, at the 7B head shape."""
    heads, kv_heads, d = 28, 4, 128
    batch = random_paged_batch(specs, heads, kv_heads, d, 16, torch.bfloat16, DEVICE, seed=7)
    ref_out, _, _ = reference_attention(batch)
    qkv = torch.cat([batch.q.flatten(1), batch.k.flatten(1), batch.v.flatten(1)], dim=1)
    n = qkv.shape[0]
    q = qkv[:, : heads * d].view(n, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(n, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(n, kv_heads, d)
    write_kv_cache(k, v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    poison_allocator()
    backend = TritonAttentionBackend(long_chunk_kernel="fa3")
    out = backend.forward(q, k, v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]


def test_long_chunk_kernel_is_checked():
    with pytest.raises(ValueError, match="long_chunk_kernel must be one of"):
        TritonAttentionBackend(long_chunk_kernel="flash")
    if fa3_forward() is None:
        with pytest.raises(ValueError, match="fa3-fwd"):
            TritonAttentionBackend(long_chunk_kernel="fa3")


def test_padded_rows_are_few_buckets_of_little_waste():
    got = [padded_rows(n) for n in (64, 1024, 1025, 2047, 2049, 8192, 8193, 16320, 32704, 131008)]
    assert got == [128, 1024, 1152, 2048, 2304, 8192, 9216, 16384, 32768, 131072]
    lengths = range(1024, 140000, 7)
    assert all(0 <= padded_rows(n) - n < n / 8 and padded_rows(n) % 128 == 0 for n in lengths)
    assert len({padded_rows(n) for n in lengths}) < 100  # 1K..131K: ~8 shapes an octave


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 45, 100])
def test_merge_two_matches_reference(n, dtype):
    gen = torch.Generator().manual_seed(n)
    heads, head_dim = 6, 128
    o1 = torch.randn(1, heads, n, head_dim, generator=gen).to(dtype)
    o2 = torch.randn(1, n, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)  # tokens outer, as cuDNN's
    l1, l2 = torch.randn(1, heads, n, generator=gen) * 4, torch.randn(1, heads, n, generator=gen) * 4
    expected = merge_two_reference(o1.float(), l1, o2.float(), l2)
    poison_allocator()
    # Written into a strided view, as the backend writes one sequence's rows of its [tokens, heads, D] output.
    out = torch.full((n, heads + 2, head_dim), float("nan"), dtype=dtype, device=DEVICE)[:, 1 : heads + 1]
    merge_two(o1.to(DEVICE), l1.to(DEVICE), o2.to(DEVICE), l2.to(DEVICE), out)
    assert rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [None, 1, 3, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("min_split_tiles", [1, 4])
def test_split_kv_decode_matches_reference(num_splits, head_dim, min_split_tiles):
    # Long and short contexts together: some splits of the short ones are empty.
    specs = [(1000, 1), (2, 1), (513, 1), (255, 1)] if not INTERPRETED else [(700, 1), (2, 1), (300, 1)]
    dtype = DTYPES[0]
    batch = random_paged_batch(specs, 14, 2, head_dim, 16, dtype, DEVICE, seed=head_dim + (num_splits or 0))
    ref_out, _, _ = reference_attention(batch)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    poison_allocator()
    backend = TritonAttentionBackend(num_splits=num_splits, decode_block_n=32, min_split_tiles=min_split_tiles)
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_verify_steps_one_program_per_query_token_match_reference(num_splits):
    """Verify steps (a sequence's last token and its drafts) launched as decode is, one program per query
    token (AttentionMetadata.per_token_queries): each token's keys end at its own position, split or not."""
    from dataclasses import replace

    specs = [(700, 5), (2, 5), (300, 2), (64, 1)] if not INTERPRETED else [(300, 5), (2, 3), (64, 1)]
    dtype = DTYPES[0]
    batch = random_paged_batch(specs, 14, 2, 128, 16, dtype, DEVICE, seed=5 + (num_splits or 0))
    ref_out, _, _ = reference_attention(batch)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    poison_allocator()
    backend = TritonAttentionBackend(num_splits=num_splits, decode_block_n=32)
    meta = replace(batch.meta, per_token_queries=True)
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[dtype]


def test_wide_decode_tiles_match_reference():
    # 70 sequences x 2 KV heads cover an H100's 132 SMs (the count assumed off CUDA): 128-wide key tiles.
    specs = [((i * 37) % 300, 1) for i in range(70)]
    batch = random_paged_batch(specs, 14, 2, 128, 16, DTYPES[0], DEVICE, seed=70)
    ref_out, _, _ = reference_attention(batch)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    poison_allocator()
    backend = TritonAttentionBackend()
    if DEVICE == "cuda" and torch.cuda.get_device_properties(0).multi_processor_count > 140:
        pytest.skip("this GPU has more SMs than the batch has (sequence, kv head) pairs")
    assert backend.decode_tile_for(torch.device(DEVICE), len(specs), 2) == 128
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[DTYPES[0]]


def test_write_kv_cache_skips_negative_slots():
    batch = random_paged_batch([(3, 5), (0, 2)], 4, 2, 64, 16, DTYPES[0], DEVICE, seed=7)
    slots = batch.meta.slot_mapping.clone()
    slots[1] = -1
    slots[5] = -1
    before_k = batch.k_cache.cpu().clone()
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, slots)
    ref_k, ref_v = before_k.clone(), batch.v_cache.cpu().clone()
    ref_k.view(-1, 2, 64)[slots[slots >= 0].cpu()] = batch.k[slots.cpu() >= 0].cpu()
    assert torch.equal(batch.k_cache.cpu(), ref_k)
    assert not torch.equal(batch.k_cache.cpu(), before_k)


FLOAT8_CACHES = [torch.float8_e4m3fn, torch.float8_e5m2]
# Triton's interpreter converts to float8 wrongly (125.4 -> 64), and GPUs before Ada have no float8 conversion.
needs_float8 = pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9),
                                  reason="float8 KV cache: a GPU of compute capability 8.9+")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return ref_attention.raw_bytes(t).cpu()


@triton.jit
def _float8_grid_kernel(x_ptr, out_ptr, n, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, round_to_float8_grid(x, MANTISSA_BITS, MIN_EXPONENT), mask=ok)


@pytest.mark.parametrize("cache_dtype", FLOAT8_CACHES)
def test_float8_grid_rounding_is_torchs_cast(cache_dtype):
    """The float8 cache's rounding (kernels/kv_store.py), still in float32: every bfloat16 value in the format's
    range (ties to even included: bfloat16 keeps more bits than float8) and random float32 values of every
    magnitude land where torch's cast puts them, signed zeros and subnormals included."""
    fmt = cache_format(torch.empty(0, dtype=cache_dtype))
    every_bf16 = torch.from_numpy(np.arange(2**16, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=gen) * torch.exp2(torch.randint(-20, 16, (200_000,), generator=gen).float())
    x = torch.cat([every_bf16, spread])
    x = x[x.isfinite() & (x.abs() <= fmt.max)]
    out = torch.empty_like(x, device=DEVICE)
    _float8_grid_kernel[(triton.cdiv(len(x), 1024),)](x.to(DEVICE), out, len(x), MANTISSA_BITS=fmt.mantissa_bits,
                                                        MIN_EXPONENT=fmt.min_exponent, BLOCK=1024)
    expected = x.to(cache_dtype).float()
    assert torch.equal(out.cpu(), expected) and torch.equal(out.cpu().signbit(), expected.signbit())


@needs_float8
@pytest.mark.parametrize("cache_dtype", FLOAT8_CACHES)
@pytest.mark.parametrize("specs", [DECODE, MIXED, [(300, 5), (2, 3), (64, 1)]], ids=["decode", "mixed", "verify"])
def test_float8_kv_cache_is_written_and_read_as_the_reference_does(specs, cache_dtype):
    """--kv-cache-dtype fp8: the write kernel stores what torch's saturating cast stores (keys scaled past
    e4m3's 448 so that some saturate), bit for bit; attention reads the float8 cache in the queries'
    dtype, within bfloat16's bound of the reference over the same float8 values."""
    from dataclasses import replace

    batch = random_paged_batch(specs, 14, 2, 128, 16, torch.bfloat16, DEVICE, seed=len(specs))
    batch = replace(batch, k=batch.k * 200, k_cache=batch.k_cache.to(cache_dtype), v_cache=batch.v_cache.to(cache_dtype),
                    scale=batch.scale / 200)
    ref_out, ref_kc, ref_vc = reference_attention(batch)
    assert (ref_kc.float().abs() == 448).any() or cache_dtype != torch.float8_e4m3fn  # saturation happened
    poison_allocator()
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    assert torch.equal(_bits(batch.k_cache), _bits(ref_kc)) and torch.equal(_bits(batch.v_cache), _bits(ref_vc))
    meta = replace(batch.meta, per_token_queries=specs[0] == (300, 5))
    out = TritonAttentionBackend().forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, batch.scale)
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]


@needs_float8
def test_rotary_and_write_kv_into_a_float8_cache():
    heads, kv_heads, head_dim = 28, 4, 128
    batch = random_paged_batch([(5, 3), (0, 20), (40, 1)], heads, kv_heads, head_dim, 16, torch.bfloat16, DEVICE, seed=3)
    k_cache, v_cache = batch.k_cache.to(torch.float8_e4m3fn), batch.v_cache.to(torch.float8_e4m3fn)
    n = batch.q.shape[0]
    rope = RotaryEmbedding(head_dim, 1024, 1e6, None)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=torch.bfloat16, generator=g) * 100
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 1024, (n,), device=DEVICE, generator=g)
    slots = batch.meta.slot_mapping
    _, ref_k = rope.forward(positions.cpu(), q.cpu(), k.cpu())
    ref_kc, ref_vc = k_cache.cpu().clone(), v_cache.cpu().clone()
    ref_attention.write_kv_cache(ref_k.view(n, kv_heads, head_dim), v.cpu().reshape(n, kv_heads, head_dim), ref_kc, ref_vc, slots.cpu())
    fused.rotary_and_write_kv(positions, q, k, v, rope.table(q.device), head_dim, k_cache, v_cache, slots)
    assert torch.equal(_bits(v_cache), _bits(ref_vc))
    # Keys: the kernel's rotation matches the reference's to bfloat16's last bit, so a key near a float8 rounding
    # boundary may land one float8 step (1/8 of it at most for e4m3) the other way.
    got, want = k_cache.float().cpu(), ref_kc.float()
    assert ((got - want).abs() <= want.abs() / 8 + 2**-9).all() and rel_err(got, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 3584), (7, 896), (300, 64), (5, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows, hidden, with_residual, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype, generator=g)
    res = torch.randn(rows, hidden, device=DEVICE, dtype=dtype, generator=g) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE, generator=g)).to(dtype)
    ref_out, ref_res = rms_norm_reference(x.cpu().float(), None if res is None else res.cpu().float(), w.cpu().float(), 1e-6)
    poison_allocator()
    out, new_res = fused.rms_norm(x, res, w, 1e-6)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(new_res, ref_res) < TOL[dtype]
    # Against the same-precision torch code (what the CPU path runs): equal up to one rounding.
    same_out, _ = rms_norm_reference(x, res, w, 1e-6)
    assert rel_err(out, same_out) < 4e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 18944), (9, 4864), (64, 100)])
def test_silu_and_mul_matches_reference(rows, inter, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, device=DEVICE, dtype=dtype, generator=g) * 3
    ref = silu_and_mul_reference(x.cpu().float())
    poison_allocator()
    assert rel_err(fused.silu_and_mul(x), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(28, 4, 128), (14, 2, 64), (4, 4, 128)])
@pytest.mark.parametrize("yarn", [False, True])
def test_rotary_matches_reference(heads, kv_heads, head_dim, yarn, dtype):
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=256) if yarn else None
    rope = RotaryEmbedding(head_dim, 1024, 1e6, scaling)
    n = 37
    g = torch.Generator(device=DEVICE).manual_seed(heads + head_dim)
    # q and k as strided column slices of one qkv tensor, the way the model passes them.
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype, generator=g)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 1024, (n,), device=DEVICE, generator=g)
    ref_q, ref_k = rope.forward(positions.cpu(), q.cpu().float(), k.cpu().float())
    poison_allocator()
    out_q, out_k = fused.rotary(positions, q, k, rope.table(q.device), head_dim)
    assert rel_err(out_q, ref_q) < TOL[dtype] and rel_err(out_k, ref_k) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features,bias", [(4608, 3584, True), (3584, 3584, False), (100, 18944, False), (37, 200, True)])
@pytest.mark.parametrize("config", [None, (16, 1024, 8), (4, 256, 4)])
def test_gemv_matches_reference(out_features, in_features, bias, config, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(out_features + in_features)
    x = torch.randn(1, in_features, device=DEVICE, dtype=dtype, generator=g)
    w = torch.randn(out_features, in_features, device=DEVICE, dtype=dtype, generator=g) * in_features**-0.5
    b = torch.randn(out_features, device=DEVICE, dtype=dtype, generator=g) if bias else None
    ref = F.linear(x.cpu().float(), w.cpu().float(), None if b is None else b.cpu().float())
    poison_allocator()
    out = fused.gemv(x, w, b) if config is None else fused.gemv(x, w, b, config)
    assert out.shape == (1, out_features) and rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("out_features,in_features,bias", [(4608, 3584, True), (100, 18944, False), (37, 200, True)])
@pytest.mark.parametrize("config", [None, (4, 2048, 4), (8, 512, 4)])
def test_gemv_of_float8_weights_applies_each_rows_scale(out_features, in_features, bias, config):
    """The FP8 method's decode: float8 weights, a float32 scale per output row, bfloat16 activations."""
    g = torch.Generator(device=DEVICE).manual_seed(out_features + in_features + 1)
    x = torch.randn(1, in_features, device=DEVICE, dtype=torch.bfloat16, generator=g)
    w = (torch.randn(out_features, in_features, device=DEVICE, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(out_features, device=DEVICE, generator=g) * in_features**-0.5 / 100
    b = torch.randn(out_features, device=DEVICE, dtype=torch.bfloat16, generator=g) if bias else None
    ref = F.linear(x.cpu().float(), w.cpu().float() * scale.cpu()[:, None], None if b is None else b.cpu().float())
    poison_allocator()
    out = fused.gemv(x, w, b, config, scale=scale)
    assert out.shape == (1, out_features) and rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_rotary_and_write_kv_matches_reference(block_size, dtype):
    heads, kv_heads, head_dim = 28, 4, 128
    batch = random_paged_batch([(5, 3), (0, 20), (40, 1)], heads, kv_heads, head_dim, block_size, dtype, DEVICE, seed=block_size)
    n = batch.q.shape[0]
    rope = RotaryEmbedding(head_dim, 1024, 1e6, None)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype, generator=g)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 1024, (n,), device=DEVICE, generator=g)
    slots = batch.meta.slot_mapping.clone()
    slots[2] = -1  # padding: not written
    ref_q, ref_k = rope.forward(positions.cpu(), q.cpu(), k.cpu())  # same dtype: the cache gets these bits
    ref_kc, ref_vc = batch.k_cache.cpu().clone(), batch.v_cache.cpu().clone()
    ref_attention.write_kv_cache(ref_k.view(n, kv_heads, head_dim), v.cpu().reshape(n, kv_heads, head_dim), ref_kc, ref_vc, slots.cpu())
    poison_allocator()
    out_q, out_k = fused.rotary_and_write_kv(positions, q, k, v, rope.table(q.device), head_dim, batch.k_cache, batch.v_cache, slots)
    assert rel_err(out_q, ref_q.float()) < TOL[dtype] and rel_err(out_k, ref_k.float()) < TOL[dtype]
    assert rel_err(batch.k_cache, ref_kc.float()) < TOL[dtype]
    assert torch.equal(batch.v_cache.cpu(), ref_vc)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_decode_attention_replays_in_a_cuda_graph():
    """Captured once (split-KV on), replayed after the lengths and the new tokens change in place:
    the kernel must read everything from device tensors."""
    specs = [(290, 1), (40, 1), (1000, 1)]  # +7 tokens still fit in each sequence's last block
    batch = random_paged_batch(specs, 28, 4, 128, 16, torch.bfloat16, DEVICE, seed=11)
    meta = batch.meta
    meta.max_seq_len = 1100  # capture for the longest context the graph will serve
    backend = TritonAttentionBackend()
    assert backend.splits_for(torch.device(DEVICE), 3, 4, meta.max_seq_len) > 1
    q, k, v, slots = batch.q, batch.k, batch.v, meta.slot_mapping  # updated in place between replays

    def step():
        write_kv_cache(k, v, batch.k_cache, batch.v_cache, slots)
        return backend.forward(q, k, v, batch.k_cache, batch.v_cache, meta, batch.scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for extra in (1, 7):  # sequences grow by `extra` tokens; new queries and keys arrive in place
        lens = [ctx + 1 + extra for ctx, _ in specs]
        meta.seq_lens = lens
        meta.seq_lens_t.copy_(torch.tensor(lens, dtype=torch.int32))
        tables = meta.block_tables.long()
        pos = torch.tensor(lens, device=DEVICE) - 1
        slots.copy_(tables[torch.arange(3, device=DEVICE), pos // 16] * 16 + pos % 16)
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, _, _ = reference_attention(batch)  # reads the cache the graph wrote, and the new q/k/v
        assert rel_err(out, ref_out) < TOL[torch.bfloat16]


@pytest.mark.skipif(DEVICE != "cuda", reason="the whole model on the GPU")
def test_model_with_kernels_matches_cpu_float32():
    """A small Qwen2 on the GPU (bf16, fused kernels, paged Triton attention, chunked prefill then
    decode) against the CPU float32 model run without a cache."""
    from qwen_serve.layers.attention import bind_kv_cache, forward_context
    from qwen_serve.loader.weights import build_model, random_weights
    from qwen_serve.models.config import ModelConfig

    cfg = ModelConfig.from_dict({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 2, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 1000, "max_position_embeddings": 4096,
    })
    cpu = build_model(cfg, torch.float32, "cpu")
    random_weights(cpu, seed=0, std=0.05)
    gpu = build_model(cfg, torch.bfloat16, "cuda")
    gpu.load_state_dict({k: v.to(torch.bfloat16) for k, v in cpu.state_dict().items()})
    n, chunk, block = 150, 64, 16
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(ids, torch.arange(n))  # [n, hidden], one causal sequence
        kv = torch.zeros(2, cfg.num_hidden_layers, 32, block, 2, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
        bind_kv_cache(gpu, kv, TritonAttentionBackend())
        table = torch.randperm(32, generator=torch.Generator().manual_seed(2))[: (n + block - 1) // block]
        outs = []
        # Chunked prefill over a cached prefix, then the rest one token at a time (decode).
        bounds = [(0, chunk), (chunk, 2 * chunk)] + [(i, i + 1) for i in range(2 * chunk, n)]
        for s, e in bounds:
            pos = torch.arange(s, e)
            meta = ref_attention.AttentionMetadata(
                [0, e - s], [e], (table[pos // block] * block + pos % block).cuda(),
                table[None].to(torch.int32).cuda(), e - s, e,
                torch.tensor([0, e - s], dtype=torch.int32, device="cuda"), torch.tensor([e], dtype=torch.int32, device="cuda"),
            )
            with forward_context(meta):
                outs.append(gpu(ids[s:e].cuda(), pos.cuda()))
        out = torch.cat(outs)
    assert rel_err(out, ref) < 3e-2
