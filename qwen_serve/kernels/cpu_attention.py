"""A decode step's attention on the CPU in one C++ call (cpu_attention.cpp): RoPE on each sequence's new token's
q and k, its k and v into the cache, and attention over the sequence's cached tokens.

Batch-1 decoding on the CPU spent ~75 us a layer in the ~15 torch operators of that step (RoPE 13, the cache
write 12, attention ~45 at 200 tokens; 2 threads, the demo model's shapes), more than a third of a
Q5_0 layer's linears. The torch code in layers/attention.py stays the path everywhere else and is this
kernel's reference (tests/test_cpu_attention.py).
"""

from __future__ import annotations

import torch

from qwen_serve.kernels import cpu_extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """CPU rows whose caches hold their dtype (a float8 cache keeps the torch path), with the kernels built."""
    return (not qkv.is_cuda and qkv.dtype in DTYPES and k_cache.dtype == qkv.dtype and qkv.is_contiguous()
            and cpu_extension.available())


def decode(qkv: torch.Tensor, rotary_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
           num_heads: int, num_kv_heads: int, scale: float) -> torch.Tensor:
    """qkv [n, (heads + 2 kv_heads) head_dim], one token of each of n sequences (q and k RoPE'd in place), the
    caches [blocks, block_size, kv_heads, head_dim], positions / slots int64 [n], block_tables [n, max_blocks]
    covering seq_lens (this token included) -> the attention output [n, heads * head_dim]."""
    return cpu_extension.build().decode_attention(qkv, rotary_table, k_cache, v_cache, positions, slots, block_tables,
                                                  seq_lens, num_heads, num_kv_heads, scale)
