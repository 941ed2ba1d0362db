"""What AWQ, GPTQ and GGUF share once loaded: integer codes repacked along the inputs.

`repack` turns a checkpoint's codes, zero points and scales into the layout of kernels/quant_linear.py
(exactly: the same numbers). `PackedIntMethod.apply` sends CUDA inputs to its Triton kernels when the
layer's fused kernels are on. 4-bit codes in groups torch's packed int4 layouts take, in a compute dtype
kernels/int4pack.py serves on the layer's device, are packed in that layout instead (scale and zero rounded
to the compute dtype). On the CPU, wider codes (5 to 8 bits) in such groups are split into two 4-bit planes for
the same matmul, one call each (`split_planes`): no torch CPU kernel reads them as they are, and the two
planes read half the bytes of a bfloat16 weight. Everything else on the CPU runs the kernels' torch
reference (the weight dequantized at each call: correct, slow).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.kernels import int4pack, quant_linear
from qwen_serve.layers.quantization.base import LinearMethod


def split_planes(codes: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """w = q * s - m with q of `bits` (5-8) bits -> two (codes, mins, scales) of 4 bits, in int4pack's form
    (q - 8) * scale + (8 * scale - min), whose weights add up to w: q = lo + 16 hi.

    The high plane's codes are hi + 8 - 2**(bits - 5), centred on 8 (its zero 0), so neither plane holds a
    large offset that the other cancels; the low plane takes what is left, (8 + 2**(bits - 1)) s - m, which
    is 8 s exactly where the minimum is 2**(bits - 1) scales (Q8_0, symmetric GPTQ-Int8) and otherwise rounds
    once to the compute dtype, as the 4-bit path's zero does (GGUF's 5- and 6-bit codes arrive as 8-bit)."""
    s = scales.float()
    half = 2 ** (bits - 5)
    low = (codes & 15, mins.float() - 2 ** (bits - 1) * s, s)
    high = ((codes >> 4) + 8 - half, 128 * s, 16 * s)
    return low, high


def repack(layer: nn.Module, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
           input_perm: torch.Tensor | None = None, int4_dtype: torch.dtype | None = None) -> None:
    """codes [N, K], zeros [N, groups] (zero point codes, or float minimums), scales [N, groups] -> the
    layer's `qweight`, `zeros`, `scales` in the kernels' layout, replacing the checkpoint's parameters.
    `input_perm` (GPTQ's act order) reorders the inputs so that each group's are contiguous; it is applied
    to x at run time. With `int4_dtype` (the compute dtype of a layer that only multiplies), 4-bit codes that
    torch's int4 matmul takes on their device are packed for it instead (`int4_weight`), and on the CPU wider
    codes as two 4-bit planes (`int4_weight` and `int4_high_weight`)."""
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        if hasattr(layer, name):
            delattr(layer, name)
    layer.register_buffer("input_perm", input_perm, persistent=False)  # None: the inputs in order
    (n, k), group = codes.shape, codes.shape[1] // scales.shape[1]
    if int4_dtype is not None and int4pack.supported(group, k, n, int4_dtype, codes.device) and (
            bits == 4 or codes.device.type == "cpu"):
        planes = [(codes, zeros, scales)]
        if bits > 4:
            mins = zeros if zeros.dtype.is_floating_point else zeros.float() * scales.float()
            planes = split_planes(codes, mins, scales, bits)
        for suffix, (c, z, sc) in zip(("", "_high"), planes):
            packed, scales_and_zeros = int4pack.pack(c, z, sc, int4_dtype)
            layer.register_buffer(f"int4{suffix}_weight", packed, persistent=False)
            layer.register_buffer(f"int4{suffix}_scales_zeros", scales_and_zeros, persistent=False)
        return
    if k % quant_linear.chunk_inputs(bits) or group % quant_linear.chunk_inputs(bits):
        raise ValueError(f"{layer.prefix}: {bits}-bit codes are packed in chunks of {quant_linear.chunk_inputs(bits)} "
                         f"inputs; {k} inputs in groups of {group} are not whole chunks")
    frozen = dict(requires_grad=False)
    layer.qweight = nn.Parameter(quant_linear.pack_codes(codes, bits), **frozen)
    if zeros.dtype.is_floating_point:  # GGUF's min form: float32 scales and minimums
        layer.zeros = nn.Parameter(zeros.float().contiguous(), **frozen)
        layer.scales = nn.Parameter(scales.float().contiguous(), **frozen)
    else:
        layer.zeros = nn.Parameter(zeros.to(torch.uint8).contiguous(), **frozen)
        layer.scales = nn.Parameter(scales.to(torch.float16).contiguous(), **frozen)


class PackedIntMethod(LinearMethod):
    """A linear method whose loaded weights were `repack`ed."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        raise NotImplementedError("the packed layout is made from a checkpoint format's weights (repack)")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if layer.input_perm is not None:
            x = x.index_select(1, layer.input_perm)  # [tokens, K] in the repacked order
        if hasattr(layer, "int4_weight"):
            group = shape[-1] // layer.int4_scales_zeros.shape[0]
            x = x.contiguous()
            out = int4pack.linear(x, layer.int4_weight, group, layer.int4_scales_zeros, bias)
            if hasattr(layer, "int4_high_weight"):
                out += int4pack.linear(x, layer.int4_high_weight, group, layer.int4_high_scales_zeros, None)
            return out.reshape(*shape[:-1], out.shape[-1])
        group = shape[-1] // layer.scales.shape[1]  # GPTQ's -1 is one group of every input
        if x.is_cuda and layer.fused:
            out = quant_linear.quant_linear(x.contiguous(), layer.qweight, layer.zeros, layer.scales, group,
                                            self.bits, bias)
        else:
            out = quant_linear.linear_reference(x, layer.qweight, layer.zeros, layer.scales, group, self.bits, bias)
        return out.reshape(*shape[:-1], out.shape[-1])
