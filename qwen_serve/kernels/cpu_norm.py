"""RMSNorm with the residual add on the CPU in one C++ call (cpu_norm.cpp); layers/norm.py's
`rms_norm_reference` is its reference (tests/test_cpu_norm.py)."""

from __future__ import annotations

import torch

from qwen_serve.kernels import cpu_extension


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return not x.is_cuda and weight.dtype == x.dtype and cpu_extension.available()


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(x + residual), x + residual); without a residual, (weight * norm(x), x)."""
    out, added = cpu_extension.build().rms_norm(x, residual, weight, eps)
    return out, added
