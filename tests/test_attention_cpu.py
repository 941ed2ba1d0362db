"""The torch attention's single-sequence CPU decode path against scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.layers.attention import AttentionMetadata, TorchAttentionBackend, _causal_attention, forward_context

BLOCK, KV_HEADS, HEADS, HEAD_DIM = 4, 2, 6, 8


def _decode_one(cache_k, cache_v, table: list[int], seq_len: int, q: torch.Tensor) -> torch.Tensor:
    meta = AttentionMetadata([0, 1], [seq_len], torch.tensor([0]), torch.tensor([table], dtype=torch.int32), 1, seq_len)
    with forward_context(meta):
        return TorchAttentionBackend().forward(q, None, None, cache_k, cache_v, meta, HEAD_DIM**-0.5)


@pytest.mark.parametrize("table", [[3, 4, 5], [5, 1, 6], [2, 3, 7]], ids=["consecutive", "scattered", "partly"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_decode_matches_sdpa(table, dtype):
    gen = torch.Generator().manual_seed(0)
    seq_len = 10  # the last of the three blocks is half full
    cache_k = torch.randn(8, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    cache_v = torch.randn(8, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(1, HEADS, HEAD_DIM, generator=gen).to(dtype)
    blocks = torch.tensor(table)
    keys = cache_k[blocks].flatten(0, 1)[:seq_len].float()
    values = cache_v[blocks].flatten(0, 1)[:seq_len].float()
    expected = _causal_attention(q.float(), keys, values, HEAD_DIM**-0.5)
    got = _decode_one(cache_k, cache_v, table, seq_len, q)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's rounding
    assert (got.float() - expected).abs().max().item() <= tolerance
