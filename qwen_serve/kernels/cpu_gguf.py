"""GGUF linears on the CPU computed from the file's own blocks (cpu_gguf.cpp), as llama.cpp's CPU backend does.

torch ships no CPU kernel for GGUF's 5-, 6- and 8-bit blocks, so without this file those layers are
dequantized to bfloat16 at load: 2.9x the bytes of Q5_0 read by every decode step, and 2 bytes a weight held.
The kernels round the activations to int8 in blocks of 32 (one float scale a block, `quantize_reference`)
and take integer dot products with each block's codes (AVX2, VNNI where the CPU has it): calls of a row or two
weight row by weight row, prefills and wider batches over tiles of 16 outputs repacked for the call (an int8
GEMM; on AVX-512 CPUs at oneDNN's bfloat16 speed without holding a bfloat16 weight). That rounding is
the only difference from the exact weights: each output moves by at most sum(|w| * d / 2) over its inputs,
d the block's activation scale (tests/test_cpu_gguf.py checks that bound and the kernels against
`linear_reference`).

Built at first use with the other CPU kernels (kernels/cpu_extension.py); where they cannot be built
`cpu_extension.available()` is False and the layers keep the dequantized path.
"""

from __future__ import annotations

import torch

from qwen_serve.kernels.cpu_extension import build

# Block formats the kernels read, by the id cpu_gguf.cpp's `Type` gives them.
TYPE_IDS = {"Q4_0": 0, "Q5_0": 1, "Q8_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# Values an activation scale covers.
ACTIVATION_BLOCK = 32


def linear(x: torch.Tensor, shards: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] times a layer whose weight is `shards` (type name, uint8 blocks [rows, row bytes]) stacked along
    the outputs, plus bias -> [M, outputs] in x's dtype."""
    return build().linear(x, [blocks for _, blocks in shards], [TYPE_IDS[t] for t, _ in shards], bias)


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> the kernels' int8 codes (as float32) [M, K] and scales [M, K / 32]: d = max|x| / 127,
    q = round-half-to-even(x * (1 / d)) in float32."""
    blocks = x.float().reshape(x.shape[0], -1, ACTIVATION_BLOCK)
    d = blocks.abs().amax(-1) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(blocks * inverse[..., None]).reshape(x.shape), d


def linear_reference(x: torch.Tensor, shards: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` in torch, in float64: the activations rounded as the kernels round them, times the weights
    the gguf decoder of layers/quantization/gguf.py gives (which match the gguf package's own)."""
    from qwen_serve.layers.quantization.gguf import dequantize

    codes, d = quantize_reference(x)
    x_rounded = (codes.reshape(*d.shape, ACTIVATION_BLOCK) * d[..., None].double()).reshape(x.shape)
    k = x.shape[1]
    weight = torch.cat([dequantize(blocks, t, (blocks.shape[0], k)) for t, blocks in shards]).double()
    out = x_rounded @ weight.T
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)
