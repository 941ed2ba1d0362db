"""GPTQ in the layout of AutoGPTQ / GPTQModel checkpoints: 4- or 8-bit weights packed along the inputs.

Checkpoint tensors of a linear with K inputs and N outputs, b bits (p = 32 / b values a word):
  qweight  int32 [K / p, N]       input row k in bits b*(k % p) of word k // p, sequentially
  qzeros   int32 [groups, N / p]  zero points packed along the outputs, sequentially; the "gptq"
                                  (v1) checkpoint format stores each zero point minus one
  scales   fp16  [groups, N]      (kept in float16: the checkpoint's exact values)
  g_idx    int32 [K]              each input row's group: k // G, or any order with `desc_act`
and w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n], y = x @ w. `sym` only fixes z at 2^(b-1);
the formula is the same. `dequantize` is the torch reference of that layout. After loading, the same numbers
are repacked along the inputs (layers/quantization/packed.py) for the kernels of kernels/quant_linear.py,
the inputs of an act-order checkpoint sorted by group (x is permuted alike at run time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_serve.layers.quantization.base import LinearMethod, QuantizationConfig, new_param
from qwen_serve.layers.quantization.packed import PackedIntMethod, repack

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True, slots=True)
class GPTQConfig(QuantizationConfig):
    bits: int
    group_size: int  # -1: one group over all inputs
    desc_act: bool
    zero_offset: int  # added to stored zero points: 1 for the v1 format, 0 for v2
    name = "gptq"

    @classmethod
    def from_config(cls, qc: dict[str, Any], source: str) -> "GPTQConfig":
        bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{source}: GPTQ with {bits} bits is not supported; supported: {SUPPORTED_BITS}")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"{source}: GPTQ group size {group_size} is not supported; supported: {SUPPORTED_GROUP_SIZES}")
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"{source}: GPTQ checkpoint format {fmt!r} is not supported; supported: {CHECKPOINT_FORMATS}")
        if qc.get("lm_head", False):
            raise ValueError(f"{source}: a GPTQ-quantized lm_head is not supported")
        return cls(bits=bits, group_size=group_size, desc_act=bool(qc.get("desc_act", False)),
                   zero_offset=1 if fmt == "gptq" else 0)

    def linear_method(self, prefix: str) -> LinearMethod:
        return GPTQLinearMethod(self)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 b-bit values, unpacked sequentially along `dim` (0: rows, 1: columns)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:  # [R, C] -> [R * p, C]
        return ((packed[:, None, :] >> shifts[None, :, None]) & mask).reshape(packed.shape[0] * per_word, -1)
    return ((packed[:, :, None] >> shifts) & mask).reshape(packed.shape[0], -1)  # [R, C * p]


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, zero_offset: int) -> torch.Tensor:
    """The weight as float32 [in_features, out_features]."""
    q = unpack(qweight, bits, dim=0)  # [K, N]
    z = unpack(qzeros, bits, dim=1) + zero_offset  # [groups, N]
    g = g_idx.long()
    return (q - z[g]).float() * scales.float()[g]


class GPTQLinearMethod(PackedIntMethod):
    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config.bits)
        self.config = config

    def _groups(self, layer: nn.Module, in_features: int) -> int:
        g = self.config.group_size
        if g == -1:
            return 1
        if in_features % g:
            raise ValueError(f"{layer.prefix}: {in_features} inputs are not a whole number of GPTQ groups of {g}")
        return in_features // g

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        p, out = 32 // self.config.bits, sum(output_sizes)
        if in_features % p:
            raise ValueError(f"{layer.prefix}: {in_features} inputs do not pack {p} to a word")
        if any(size % p for size in output_sizes):
            raise ValueError(f"{layer.prefix}: GPTQ zero points pack {p} outputs a word; output sizes {output_sizes} do not divide")
        groups, load = self._groups(layer, in_features), layer.weight_loader
        layer.qweight = new_param((in_features // p, out), torch.int32, load, input_dim=0, packed_dim=0, pack_factor=p,
                                  output_dim=1)
        layer.qzeros = new_param((groups, out // p), torch.int32, load, input_dim=0, output_dim=1, packed_dim=1, pack_factor=p)
        layer.scales = new_param((groups, out), torch.float16, load, input_dim=0, output_dim=1)
        layer.g_idx = new_param((in_features,), torch.int32, functools.partial(_load_g_idx, layer, groups), input_dim=0)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        c = self.config
        k = layer.g_idx.shape[0]
        groups = layer.scales.shape[0]
        size = k // groups
        g_idx = layer.g_idx.data.long()
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            split = " (this rank's inputs under tensor parallelism: act-order checkpoints whose groups mix inputs " \
                "of several ranks cannot be split)" if getattr(layer, "splits_inputs", False) else ""
            raise ValueError(f"{layer.prefix}.g_idx: group indices outside [0, {groups}){split}")
        counts = torch.bincount(g_idx, minlength=groups)
        if bool((counts != size).any()):
            raise ValueError(f"{layer.prefix}.g_idx: every group must hold {size} inputs")
        in_order = torch.equal(g_idx, torch.arange(k, device=g_idx.device) // size)
        perm = None if in_order else torch.argsort(g_idx, stable=True)
        codes = unpack(layer.qweight.data, c.bits, dim=0).t()  # [N, K]
        if perm is not None:
            codes = codes[:, perm]
        zeros = (unpack(layer.qzeros.data, c.bits, dim=1) + c.zero_offset).t()  # [N, groups]
        repack(layer, codes, zeros, layer.scales.data.t(), c.bits, perm, int4_dtype=layer.params_dtype)


def _load_g_idx(layer: nn.Module, groups: int, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    """g_idx through the layer's loader; a rank holding a slice of the inputs numbers its groups from 0."""
    layer.weight_loader(param, loaded, shard)
    if getattr(layer, "splits_inputs", False):
        param.data -= layer.parallel.rank * groups
