"""AWQ in AutoAWQ's "gemm" layout: 4-bit weights with a zero point per group of input rows.

Checkpoint tensors of a linear with K inputs and N outputs, groups of G input rows:
  qweight  int32 [K, N / 8]   eight 4-bit values per word, nibble j holding column AWQ_ORDER[j] of its eight
  qzeros   int32 [K / G, N / 8]  the groups' zero points, packed alike
  scales   fp16  [K / G, N]   (kept in float16 whatever the compute dtype: the checkpoint's exact values)
and w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], so that y = x @ w (w is [K, N], inputs first).
`dequantize` is the torch reference of that layout. After loading, the same numbers are repacked along the
inputs (layers/quantization/packed.py) for the dequantize-matmul kernels (kernels/quant_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_serve.layers.quantization.base import LinearMethod, QuantizationConfig, new_param
from qwen_serve.layers.quantization.packed import PackedIntMethod, repack

# The column of its 8-column group that each nibble (bits 4j..4j+3) of a word holds.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True, slots=True)
class AWQConfig(QuantizationConfig):
    group_size: int
    bits: int = 4
    name = "awq"

    @classmethod
    def from_config(cls, qc: dict[str, Any], source: str) -> "AWQConfig":
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        version = str(qc.get("version", "gemm")).lower()
        zero_point = qc.get("zero_point", True)
        if bits != 4:
            raise ValueError(f"{source}: AWQ with {bits} bits is not supported; qwen-serve serves 4-bit AWQ")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"{source}: AWQ group size {group_size} is not supported; supported: {SUPPORTED_GROUP_SIZES}")
        if version != "gemm":
            raise ValueError(f"{source}: AWQ version {version!r} is not supported; qwen-serve reads the 'gemm' layout")
        if not zero_point:
            raise ValueError(f"{source}: AWQ without zero points is not supported; the 'gemm' layout has them")
        return cls(group_size=group_size, bits=bits)

    def linear_method(self, prefix: str) -> LinearMethod:
        return AWQLinearMethod(self)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> int32 [R, C] of 4-bit values in column order (AWQ_ORDER undone)."""
    # Column c sits in nibble AWQ_ORDER.index(c) = 4 * (c % 2) + c // 2; made with device ops, not from a
    # host list, so that a CUDA graph can capture it.
    c = torch.arange(8, dtype=torch.int32, device=packed.device)
    shifts = 4 * (4 * (c % 2) + c // 2)
    return ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight as float32 [in_features, out_features] (exact: a 4-bit difference times a float16)."""
    q = unpack_columns(qweight)  # [K, N]
    z = unpack_columns(qzeros).repeat_interleave(group_size, dim=0)  # [K, N]
    return (q - z).float() * scales.float().repeat_interleave(group_size, dim=0)


class AWQLinearMethod(PackedIntMethod):
    def __init__(self, config: AWQConfig) -> None:
        super().__init__(config.bits)
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        g, out = self.config.group_size, sum(output_sizes)
        if in_features % g:
            raise ValueError(f"{layer.prefix}: {in_features} inputs are not a whole number of AWQ groups of {g}")
        if any(size % 8 for size in output_sizes):
            raise ValueError(f"{layer.prefix}: AWQ packs 8 outputs a word; output sizes {output_sizes} do not divide")
        packed = dict(output_dim=1, packed_dim=1, pack_factor=8)
        layer.qweight = new_param((in_features, out // 8), torch.int32, layer.weight_loader, input_dim=0, **packed)
        layer.qzeros = new_param((in_features // g, out // 8), torch.int32, layer.weight_loader, input_dim=0, **packed)
        layer.scales = new_param((in_features // g, out), torch.float16, layer.weight_loader, input_dim=0, output_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes = unpack_columns(layer.qweight.data).t()  # [N, K]
        zeros = unpack_columns(layer.qzeros.data).t()  # [N, K / G]
        repack(layer, codes, zeros, layer.scales.data.t(), self.bits, int4_dtype=layer.params_dtype)
