"""The one place where layers choose a fused GPU kernel over their torch code.

`use_kernels(x)` is true only for CUDA tensors when Triton is importable and the environment does
not set QWEN_SERVE_FUSED_KERNELS=0 (for A/B measurements and debugging). The CPU path never
imports Triton. `ops()` returns `qwen_serve.kernels.fused` (imported on first use); the torch code
each kernel replaces stays in the layer and is the reference the GPU tests compare against.
On the CPU, `linear` goes to `worker.cpu_linear.linear`, which knows the weights prepared at load.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from qwen_serve.worker import cpu_linear


@functools.lru_cache(maxsize=None)
def kernels_available() -> bool:
    """Whether CUDA tensors go to the Triton kernels (Triton importable, not turned off)."""
    if os.environ.get("QWEN_SERVE_FUSED_KERNELS", "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


def use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and kernels_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except one-row inputs on CUDA (batch-1 decode) go to the Triton GEMV, and CPU inputs
    to worker/cpu_linear.py (for weights packed for oneDNN, or given float32 copies, at load)."""
    if x.dim() == 2 and x.shape[0] == 1 and use_kernels(x):
        return ops().gemv(x, weight, bias)
    if x.is_cpu:
        return cpu_linear.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def rotary_and_cache(positions, q, k, v, rotary, attn) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """RoPE on q and k in one kernel that also writes k and v into `attn`'s bound cache when this
    step has one. Returns (q, k, whether the cache was written)."""
    from qwen_serve.layers.attention import current_metadata

    meta = current_metadata(q.shape[0])
    table = rotary.table(q.device)
    if attn.k_cache is None or meta.slot_mapping is None:
        q, k = ops().rotary(positions, q, k, table, rotary.head_dim)
        return q, k, False
    q, k = ops().rotary_and_write_kv(
        positions, q, k, v, table, rotary.head_dim, attn.k_cache, attn.v_cache, meta.slot_mapping
    )
    return q, k, True


@functools.lru_cache(maxsize=None)
def ops() -> ModuleType:
    from qwen_serve.kernels import fused

    return fused


@functools.lru_cache(maxsize=None)
def attention_ops() -> ModuleType:
    from qwen_serve.kernels import attention

    return attention
