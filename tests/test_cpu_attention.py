"""The CPU's one-call decode attention (kernels/cpu_attention.cpp) against the torch path it replaces
(layers/attention.py: RoPE in place, the cache write, TorchAttentionBackend's decode of one sequence or a
padded batch of several)."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.kernels import cpu_attention, cpu_extension
from qwen_serve.layers.attention import Attention, AttentionMetadata, forward_context
from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu_extension.available(), reason="the CPU kernels cannot be built here")

BLOCK, NUM_BLOCKS = 16, 24


def _layer(heads: int, kv_heads: int, head_dim: int, kernels: bool) -> Attention:
    rotary = RotaryEmbedding(head_dim, 4096, 1e6, None)
    return Attention(heads, kv_heads, head_dim, head_dim**-0.5, rotary, LayerOptions(fused_kernels=kernels))


def _step(layer: Attention, qkv: torch.Tensor, caches: tuple[torch.Tensor, torch.Tensor], tables: list[list[int]],
          seq_lens: list[int], slots: list[int]) -> torch.Tensor:
    layer.k_cache, layer.v_cache = caches
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    n = len(seq_lens)
    meta = AttentionMetadata(list(range(n + 1)), list(seq_lens), torch.tensor(slots), padded, 1, max(seq_lens))
    with forward_context(meta):
        return layer(torch.tensor([length - 1 for length in seq_lens]), qkv)


def _case(heads, kv_heads, head_dim, dtype, seq_lens, tables, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(len(seq_lens), width, generator=gen).to(dtype)
    cache = torch.randn(2, NUM_BLOCKS, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    slots = [table[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for n, table in zip(seq_lens, tables)]
    results = {}
    for kernels in (False, True):
        layer = _layer(heads, kv_heads, head_dim, kernels)
        caches = (cache[0].clone(), cache[1].clone())
        x = qkv.clone()
        out = _step(layer, x, caches, tables, seq_lens, slots)
        results[kernels] = (out, x, caches)
    return results, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (4, 4, 32), (6, 2, 128)])
@pytest.mark.parametrize("seq_lens,tables", [
    ([1], [[3]]), ([37], [[5, 0, 9]]), ([300], [list(range(4, 23))]),
    ([37, 1, 20], [[5, 0, 9], [23], [1, 2]]),  # several sequences: the torch path pads them to the longest
], ids=["first", "scattered", "long", "three-sequences"])
def test_decode_attention_matches_the_torch_path(dtype, heads, kv_heads, head_dim, seq_lens, tables, monkeypatch):
    """The output, the RoPE'd q|k left in qkv and the cache after the write: float32 within 1e-5 (the
    kernel's own exp and summation order), float16 / bfloat16 within one rounding of the output's dtype
    (the same float32 values either side of a rounding boundary)."""
    calls = []
    decode = cpu_attention.decode
    monkeypatch.setattr(cpu_attention, "decode", lambda *args: calls.append(1) or decode(*args))
    results, slots = _case(heads, kv_heads, head_dim, dtype, seq_lens, tables)
    assert len(calls) == 1  # the layer with kernels on took it, the other the torch path
    (ref, ref_qkv, ref_caches), (got, got_qkv, got_caches) = results[False], results[True]
    assert got.dtype == dtype and got.shape == (len(seq_lens), heads * head_dim)
    eps = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    scale = ref.float().abs().amax().item()
    assert (got.float() - ref.float()).abs().max().item() <= eps * max(scale, 1.0)
    assert (got_qkv.float() - ref_qkv.float()).abs().max().item() <= eps * ref_qkv.float().abs().amax().item()
    for mine, theirs in zip(got_caches, ref_caches):
        assert (mine.float() - theirs.float()).abs().max().item() <= eps * theirs.float().abs().amax().item()
        untouched = torch.ones(NUM_BLOCKS * BLOCK, dtype=torch.bool)
        untouched[slots] = False
        untouched = untouched.view(NUM_BLOCKS, BLOCK)
        assert torch.equal(mine[untouched], theirs[untouched])  # nothing but the slots written


def test_the_kernel_serves_cpu_rows_whose_cache_holds_their_dtype():
    layer = _layer(4, 2, 32, True)
    qkv = torch.randn(1, 8 * 32).bfloat16()
    assert cpu_attention.supported(qkv, torch.zeros(2, 16, 2, 32, dtype=torch.bfloat16))
    assert not cpu_attention.supported(qkv, torch.zeros(2, 16, 2, 32, dtype=torch.float8_e4m3fn))
    assert cpu_attention.supported(torch.randn(3, 8 * 32).bfloat16(), torch.zeros(2, 16, 2, 32).bfloat16())
    assert not cpu_attention.supported(qkv.float(), torch.zeros(2, 16, 2, 32).bfloat16())
    assert layer.cpu_kernels and not _layer(4, 2, 32, False).cpu_kernels


def test_a_negative_slot_writes_nothing_and_bad_inputs_are_refused():
    module = cpu_extension.build()
    heads, kv_heads, head_dim = 4, 2, 32
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim)
    k_cache, v_cache = torch.randn(2, 4, BLOCK, kv_heads, head_dim).unbind(0)
    before = (k_cache.clone(), v_cache.clone())
    table = RotaryEmbedding(head_dim, 64, 1e6, None).table(torch.device("cpu"))
    blocks = torch.tensor([[2, 0]], dtype=torch.int32)

    def call(position=20, slot=-1, block_ids=blocks, length=21, rotary=table):
        return module.decode_attention(qkv.clone(), rotary, k_cache, v_cache, torch.tensor([position]),
                                       torch.tensor([slot]), block_ids, [length], heads, kv_heads, head_dim**-0.5)

    assert call().shape == (1, heads * head_dim)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    with pytest.raises(RuntimeError, match="position 64 is outside the rotary table"):
        call(position=64)
    with pytest.raises(RuntimeError, match="slot 64 is outside the cache"):
        call(slot=4 * BLOCK)
    with pytest.raises(RuntimeError, match="a block id is outside the cache"):
        call(block_ids=torch.tensor([[2, 4]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="covers fewer than 33 tokens"):
        call(length=33)
    with pytest.raises(RuntimeError, match="rotary table must be float32"):
        call(rotary=table.bfloat16())
    with pytest.raises(RuntimeError, match="one block table and one length a sequence"):
        call(block_ids=torch.tensor([[2, 0], [1, 3]], dtype=torch.int32))
