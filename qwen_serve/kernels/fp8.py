"""FP8 (float8_e4m3fn) W8A8 matmul: weights with one scale per output channel, activations quantized per
token (or with one static scale) at run time, multiplied by torch's scaled matmul (cuBLASLt's FP8 tensor
cores with row-wise scales, which need compute capability 9.0: Hopper).

`linear_reference` is the same arithmetic in float32 (the quantized values dequantized and multiplied):
what the GPU tests compare the scaled matmul against, and what runs on a device without one (tests only:
the method refuses such devices when an engine starts).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A scale is at least this, so that a row of zeros divides by something and stays zero.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8 [N, K], float32 scales [N]) with each row's largest magnitude at FP8_MAX."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8 [M, K], float32 scales [M, 1]): each row's own scale, or `static_scale` (a
    checkpoint's one input scale) for every row; values beyond it saturate at +-FP8_MAX."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           input_scale: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """x [M, K] in bfloat16, weight float8 [N, K], weight_scale [N] -> [M, N] in x's dtype. CUDA only; with
    `fused`, the activations are quantized by one Triton kernel (kernels/fused.py), else by `quantize_rows`."""
    if fused:
        from qwen_serve.kernels.fused import fp8_quantize_rows

        xq, x_scale = fp8_quantize_rows(x, input_scale)
    else:
        xq, x_scale = quantize_rows(x, input_scale)
    # The second operand must be column-major: the transposed view of the row-major [N, K] weight is.
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=x.dtype)
    return out if bias is None else out + bias


def linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                     input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` in float32 on any device: the same quantized values, dequantized."""
    xq, x_scale = quantize_rows(x, input_scale)
    w = weight.float() * weight_scale.float()[:, None]
    out = (xq.float() * x_scale) @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
