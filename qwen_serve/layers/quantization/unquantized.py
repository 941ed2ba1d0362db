"""Weights stored as they are computed: a [out_features, in_features] tensor in the model's dtype.

`apply` picks the kernel by device and rows: on CUDA one row (batch-1 decode) goes to the Triton GEMV
when the layer's fused kernels are on, other calls to `F.linear`; on the CPU to kernels/cpu_linear.py
(oneDNN-packed weights, or float32 copies for many-row calls, prepared by its `pack_linears` at load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_serve.kernels import cpu_linear
from qwen_serve.layers.quantization.base import LinearMethod, new_param


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.weight = new_param((sum(output_sizes), in_features), params_dtype, layer.weight_loader,
                                 output_dim=0, input_dim=1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        if x.is_cpu:
            return cpu_linear.linear(x, weight, bias)
        if x.dim() == 2 and x.shape[0] == 1 and layer.fused and x.is_cuda:
            from qwen_serve.kernels import fused

            return fused.gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)
