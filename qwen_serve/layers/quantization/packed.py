"""What AWQ and GPTQ share once loaded: integer codes repacked along the inputs, run by one kernel.

`repack` turns a checkpoint's codes, zero points and scales into the layout of kernels/quant_linear.py
(exactly: the same numbers). `PackedIntMethod.apply` sends CUDA inputs to its Triton kernels when the
layer's fused kernels are on, and everything else to their torch reference.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.kernels import quant_linear
from qwen_serve.layers.quantization.base import LinearMethod


def repack(layer: nn.Module, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
           input_perm: torch.Tensor | None = None) -> None:
    """codes [N, K], zeros [N, groups] (codes), scales [N, groups] -> the layer's `qweight`, `zeros`,
    `scales` in the kernels' layout, replacing the checkpoint's parameters; `input_perm` (GPTQ's act
    order) reorders the inputs so that each group's are contiguous, and is applied to x at run time."""
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        if hasattr(layer, name):
            delattr(layer, name)
    frozen = dict(requires_grad=False)
    layer.qweight = nn.Parameter(quant_linear.pack_along_k(codes, bits), **frozen)
    layer.zeros = nn.Parameter(zeros.to(torch.uint8).contiguous(), **frozen)
    layer.scales = nn.Parameter(scales.to(torch.float16).contiguous(), **frozen)
    if input_perm is not None:
        layer.register_buffer("input_perm", input_perm, persistent=False)
    else:
        layer.input_perm = None


class PackedIntMethod(LinearMethod):
    """A linear method whose loaded weights were `repack`ed; subclasses set `bits`."""

    bits: int

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if layer.input_perm is not None:
            x = x.index_select(1, layer.input_perm)  # [tokens, K] in the repacked order
        group = shape[-1] // layer.scales.shape[1]  # GPTQ's -1 is one group of every input
        if x.is_cuda and layer.fused:
            out = quant_linear.quant_linear(x.contiguous(), layer.qweight, layer.zeros, layer.scales, group,
                                            self.bits, bias)
        else:
            out = quant_linear.linear_reference(x, layer.qweight, layer.zeros, layer.scales, group, self.bits, bias)
        return out.reshape(*shape[:-1], out.shape[-1])
