"""RMSNorm with the residual add folded in, as the decoder layer uses it: (norm(x + residual), x + residual)."""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.kernels import cpu_norm
from qwen_serve.layers.options import LayerOptions


def rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch code of the fused kernel (kernels/fused.py `rms_norm`): (normed, new residual)."""
    if residual is not None:
        x = x + residual
    residual = x
    h = x.float()
    # In place on the float32 copy (never on x itself, which is returned as the residual).
    scale = h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    h = h.mul_(scale) if h is not x else h * scale
    return weight * h.to(x.dtype), residual


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, opts: LayerOptions, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=params_dtype), requires_grad=False)
        self.eps = eps
        self.fused = opts.fused
        self.cpu_kernels = opts.fused_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds `residual` first when given; returns (normed, new residual)."""
        if self.fused and x.is_cuda:
            from qwen_serve.kernels import fused

            return fused.rms_norm(x, residual, self.weight, self.eps)
        if self.cpu_kernels and cpu_norm.supported(x, self.weight):
            return cpu_norm.rms_norm(x, residual, self.weight, self.eps)
        return rms_norm_reference(x, residual, self.weight, self.eps)
