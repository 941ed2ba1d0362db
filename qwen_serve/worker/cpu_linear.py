"""Prepacked oneDNN weights for bfloat16 linear layers on the CPU.

`F.linear` with bfloat16 weights on the CPU hands oneDNN a plain row-major weight on every call, so
each call reorders it into oneDNN's blocked layout first; for decode (a few rows) that costs more
than the matmul itself. Packing each weight once at load time (what inductor's CPU freezing and
IPEX do) roughly halves a batch-1 decode step. The packed tensor replaces the parameter (no second
copy), and `layers.kernel_dispatch.linear` sends packed weights to oneDNN's linear. Results are
bit-identical to `F.linear` for bfloat16 (checked before packing), so only bfloat16 models are
packed: float32 packing uses a kernel whose rounding differs slightly.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bfloat16 -> the same weight in oneDNN's layout (the batch-size hint 1 only tunes it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def packing_works() -> bool:
    """oneDNN with bfloat16 is present and a packed linear gives exactly F.linear's results."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=gen).bfloat16()
        b = torch.randn(48, generator=gen).bfloat16()
        x = torch.randn(3, 32, generator=gen).bfloat16()
        return bool(torch.equal(packed_linear(x, pack_weight(w), b), F.linear(x, w, b)))
    except (RuntimeError, AttributeError):
        return False


class PackedLinear(nn.Module):
    """Stands in for an nn.Linear: `weight` is the packed buffer, so both calling the module and
    `kernel_dispatch.linear(x, module.weight)` reach oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", pack_weight(linear.weight), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Packs the weight of every linear layer of a bfloat16 CPU model (a weight shared with the
    embedding table stays as it is); returns how many were packed."""
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.bfloat16 or not packing_works():
        return 0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if id(getattr(child, "weight", None)) in embeddings:
                    continue
                if isinstance(child, nn.Linear):
                    setattr(parent, name, PackedLinear(child))
                    count += 1
                elif type(child).__name__ == "MergedLinear":  # its forward goes through kernel_dispatch.linear
                    packed = pack_weight(child.weight)
                    del child.weight  # the packed buffer becomes the only copy
                    child.register_buffer("weight", packed, persistent=False)
                    count += 1
    log.info("packed %d linear layers for oneDNN", count)
    return count
