"""Random paged-attention batches for the kernel tests and benchmarks (no Triton needed).

A batch is a list of (cached context length, new query length) per sequence. Cache blocks are
handed out in a shuffled order, so block tables are never the identity and a kernel that ignores
them fails. The cache holds random values, which stand for the cached prefix; the new tokens'
keys and values are separate tensors whose slots `slot_mapping` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_serve.layers.attention import AttentionMetadata


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float

    @property
    def kv_bytes_read(self) -> int:
        """Bytes of K and V one attention pass must read at least (each cached token once)."""
        per_token = 2 * self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        return sum(self.meta.seq_lens) * per_token


def random_paged_batch(
    specs: list[tuple[int, int]],  # per sequence: (cached context length, new tokens)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    spare_blocks: int = 2,
) -> PagedBatch:
    if not specs or any(ctx < 0 or new < 1 for ctx, new in specs):
        raise ValueError("each sequence needs context >= 0 and at least one new token")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq_lens = [ctx + new for ctx, new in specs]
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(specs), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = order[used : used + nb].to(torch.int32)
        used += nb
    starts, slots = [0], []
    for i, (ctx, new) in enumerate(specs):
        starts.append(starts[-1] + new)
        pos = torch.arange(ctx, ctx + new)
        slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    num_tokens = starts[-1]

    dev_gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=dev_gen, device=device, dtype=dtype)

    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=seq_lens,
        slot_mapping=torch.cat(slots).to(device),
        block_tables=tables.to(device),
        max_query_len=max(new for _, new in specs),
        max_seq_len=max(seq_lens),
        query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )
    return PagedBatch(
        q=randn(num_tokens, num_heads, head_dim),
        k=randn(num_tokens, num_kv_heads, head_dim),
        v=randn(num_tokens, num_kv_heads, head_dim),
        k_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        meta=meta,
        scale=head_dim**-0.5,
    )
