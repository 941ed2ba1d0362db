"""SwiGLU over a merged gate|up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_serve.layers.options import LayerOptions


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * inter] (gate | up) -> [num_tokens, inter]; the torch code of the fused kernel."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class SiluAndMul(nn.Module):
    def __init__(self, opts: LayerOptions) -> None:
        super().__init__()
        self.fused = opts.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda:
            from qwen_serve.kernels import fused

            return fused.silu_and_mul(x)
        return silu_and_mul_reference(x)
