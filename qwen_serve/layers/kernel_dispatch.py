"""The one place where layers choose a fused GPU kernel over their torch code.

`use_kernels(x)` is true only for CUDA tensors when Triton is importable and the environment does
not set QWEN_SERVE_FUSED_KERNELS=0 (for A/B measurements and debugging). The CPU path never
imports Triton. `ops()` returns `qwen_serve.kernels.fused` (imported on first use); the torch code
each kernel replaces stays in the layer and is the reference the GPU tests compare against.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch


@functools.lru_cache(maxsize=None)
def _kernels_available() -> bool:
    if os.environ.get("QWEN_SERVE_FUSED_KERNELS", "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


def use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and _kernels_available()


@functools.lru_cache(maxsize=None)
def ops() -> ModuleType:
    from qwen_serve.kernels import fused

    return fused


@functools.lru_cache(maxsize=None)
def attention_ops() -> ModuleType:
    from qwen_serve.kernels import attention

    return attention
