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


def test_verify_steps_padded_to_q_rows_keep_each_real_rows_attention():
    """The verify CUDA graphs lay every sequence over q rows (worker/cuda_graphs.pad_to_query_len): the padding
    writes no KV and the real rows attend exactly as in the unpadded step (torch reference on both)."""
    from qwen_serve.kernels.random_batch import random_paged_batch
    from qwen_serve.layers.attention import write_kv_cache
    from qwen_serve.worker.cuda_graphs import pad_to_query_len

    specs, q = [(9, 3), (4, 1), (0, 2)], 4
    batch = random_paged_batch(specs, HEADS, KV_HEADS, HEAD_DIM, BLOCK, torch.float32, "cpu", seed=3)
    meta, n = batch.meta, len(specs)
    kc, vc = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(batch.k, batch.v, kc, vc, meta.slot_mapping)
    expected = TorchAttentionBackend().forward(batch.q, batch.k, batch.v, kc, vc, meta, batch.scale)

    positions = [p for ctx, new in specs for p in range(ctx, ctx + new)]
    layout = pad_to_query_len([ctx for ctx, _ in specs], meta.query_start_loc, positions, meta.slot_mapping.tolist(), q)
    assert layout.positions == [9, 10, 11, 11, 4, 4, 4, 4, 0, 1, 1, 1] and layout.seq_lens == [13, 8, 4]
    assert layout.rows == [0, 1, 2, 4, 8, 9] and layout.slots.count(-1) == n * q - len(positions)
    rows = torch.tensor(layout.rows)

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = torch.randn(n * q, *x.shape[1:])  # padding rows hold anything
        out[rows] = x
        return out

    width = max(-(-length // BLOCK) for length in layout.seq_lens)
    tables = torch.zeros(n, width, dtype=torch.int32)  # entries past a real length: any valid block id
    tables[:, : meta.block_tables.shape[1]] = meta.block_tables
    padded_meta = AttentionMetadata(list(range(0, n * q + 1, q)), layout.seq_lens, torch.tensor(layout.slots),
                                    tables, q, max(layout.seq_lens))
    pk, pv = padded(batch.k), padded(batch.v)
    kc2, vc2 = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(pk, pv, kc2, vc2, padded_meta.slot_mapping)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)
    out = TorchAttentionBackend().forward(padded(batch.q), pk, pv, kc2, vc2, padded_meta, batch.scale)
    torch.testing.assert_close(out[rows], expected)
