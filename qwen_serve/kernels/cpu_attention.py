"""A single sequence's decode step of attention on the CPU in one C++ call (cpu_attention.cpp): RoPE on the
token's q and k, its k and v into the cache, and attention over the sequence's cached tokens.

Batch-1 decoding on the CPU spends ~75 us a layer in the ~15 torch operators of that step (RoPE 13, the cache
write 12, attention ~45 at 200 tokens; 2 threads, the demo model's shapes), more than a third of a
Q5_0 layer's linears. The torch code in layers/attention.py stays the path everywhere else and is this
kernel's reference (tests/test_cpu_attention.py).
"""

from __future__ import annotations

import torch

from qwen_serve.kernels import cpu_extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """One CPU row whose caches hold its dtype (a float8 cache keeps the torch path), with the kernels built."""
    return (qkv.shape[0] == 1 and not qkv.is_cuda and qkv.dtype in DTYPES and k_cache.dtype == qkv.dtype
            and qkv.is_contiguous() and cpu_extension.available())


def decode(qkv: torch.Tensor, rotary_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           position: torch.Tensor, slot: torch.Tensor, block_table: torch.Tensor, seq_len: int, num_heads: int,
           num_kv_heads: int, scale: float) -> torch.Tensor:
    """qkv [1, (heads + 2 kv_heads) head_dim] (q and k RoPE'd in place), the caches [blocks, block_size,
    kv_heads, head_dim], position / slot [1], block_table: the sequence's block ids covering `seq_len` tokens
    (this one included) -> the attention output [1, heads * head_dim]."""
    return cpu_extension.build().decode_attention(qkv, rotary_table, k_cache, v_cache, position, slot, block_table,
                                                  seq_len, num_heads, num_kv_heads, scale)
