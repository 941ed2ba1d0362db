"""bfloat16 linear layers on the CPU: prepacked oneDNN weights, or float32 copies where packing fails.

`F.linear` with bfloat16 weights on the CPU hands oneDNN a plain row-major weight on every call, so
each call reorders it into oneDNN's blocked layout first; for decode (a few rows) that costs more
than the matmul itself. Packing each weight once at load time (what inductor's CPU freezing and
IPEX do) roughly halves a batch-1 decode step. The packed tensor replaces the parameter (no second
copy), and `linear` sends packed weights to oneDNN's linear. Results are
bit-identical to `F.linear` for bfloat16 (checked before packing), so only bfloat16 models are
packed: float32 packing uses a kernel whose rounding differs slightly.

oneDNN packs bfloat16 only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT. Elsewhere (AVX2-only
CPUs) `F.linear` in bfloat16 is emulated at ~25-30 GFLOP/s for any number of rows, against 50-100
GFLOP/s for float32 from a few dozen rows up. There, each linear weight gets a float32 copy at load
(`add_float32_copies`, when it fits in memory) and `linear` runs calls of many rows (prefill, batched
decode) in float32 on it; calls of few rows (batch-1 decode, memory-bound) keep the bfloat16 weight,
which reads half the bytes. The unquantized linear method sends every CPU call to `linear`. The
emulated bfloat16 matmul accumulates in float32 too, so the two routes differ only in the rounding of
a few outputs in ten thousand (last bfloat16 bit).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bfloat16 -> the same weight in oneDNN's layout (the batch-size hint 1 only tunes it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


# Rows from which a bfloat16 linear with a float32 copy runs in float32. Measured 2026-11-23 on the
# 2-core AMD EPYC with AVX2 and no AVX-512, torch 2.13.0+cpu, 2 threads, quiet machine: median ms of
# F.linear in bfloat16 / F.linear(x.float(), w32, b32).to(bfloat16), the demo model's shapes:
#   rows                  1          2          4          8         16         32         64
#   qkv 1152x896+b    0.09/0.13  0.23/0.28  0.31/0.29  0.63/0.36  1.40/0.50  2.64/0.85  5.41/1.82
#   o 896x896         0.06/0.08  0.10/0.15  0.20/0.20  0.42/0.23  0.81/0.36  2.18/0.57  4.36/1.04
#   gate_up 9728x896  0.78/3.14  1.54/6.46  2.94/6.46  6.54/5.94  9.49/6.61  22.4/11.0  48.6/22.2
#   down 896x4864     0.30/0.98  0.68/2.19  1.33/2.68  2.66/2.50  6.43/3.02  9.85/4.33  20.1/7.03
#   lm_head 151936x896 11.4/48.4 20.0/107   45.2/120   101/136    185/134    454/194    660/317
# At 2 threads float32 wins from 8 rows for all but the lm_head, which wins from 12-16 (a second run:
# 0.70x at 8 rows, 1.11x at 12), so at 8 rows a step is about even (the 96 linears of the 24 decoder
# layers gain ~5-30 ms, the lm_head loses ~35). At 1 thread float32 wins from 8 rows everywhere
# (gate_up 12.3/7.0, lm_head 132/108 ms) and is level at 4. Below 4 rows it loses up to 4x: there
# the bfloat16 weight's half-size read wins. End to end (demo model, 2 threads, same process, quiet
# machine): a 512-token prefill 12.6 -> 3.4 s, a step of 16 decodes 560 -> 381 ms.
FLOAT32_MIN_ROWS = 8

_FLOAT32_COPY = "_qwen_serve_float32_copy"  # the attribute of a bfloat16 weight that holds its copy


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on the CPU for weights prepared here: packed ones go to oneDNN, ones with a float32
    copy run in float32 from FLOAT32_MIN_ROWS rows (rounded back to x's dtype once, at the end)."""
    if weight.is_mkldnn:
        return packed_linear(x, weight, bias)
    weight32 = getattr(weight, _FLOAT32_COPY, None)
    if weight32 is not None and x.numel() // x.shape[-1] >= FLOAT32_MIN_ROWS:
        bias32 = None if bias is None else bias.float()
        return F.linear(x.float(), weight32, bias32).to(x.dtype)
    return F.linear(x, weight, bias)


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


def _unquantized_layers(model: nn.Module, with_lookup_tables: bool) -> list[nn.Module]:
    """The layers whose weight is a plain tensor (unquantized linear method); the input embedding table
    (and a tied lm_head, the same module) only when asked: its rows are looked up, so it stays a tensor."""
    from qwen_serve.layers.quantization.unquantized import UnquantizedLinearMethod

    return [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod)
            and (with_lookup_tables or not getattr(m, "used_for_lookup", False))]


def pack_linears(model: nn.Module) -> int:
    """Prepares the unquantized linear layers of a bfloat16 CPU model: packs their weights for oneDNN
    (an embedding table that is also the lm_head stays as it is) or, on CPUs where that does not work,
    gives them float32 copies (`add_float32_copies`). Returns how many layers were prepared."""
    layers = _unquantized_layers(model, with_lookup_tables=False)
    if not layers or layers[0].weight.device.type != "cpu" or layers[0].weight.dtype != torch.bfloat16:
        return 0
    if not packing_works():
        return add_float32_copies(model)
    with torch.no_grad():
        for layer in layers:
            packed = pack_weight(layer.weight)
            del layer.weight  # the packed buffer becomes the only copy
            layer.register_buffer("weight", packed, persistent=False)
    log.info("packed %d linear layers for oneDNN", len(layers))
    return len(layers)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def add_float32_copies(model: nn.Module, max_memory_fraction: float = 0.25) -> int:
    """Gives the weight of every unquantized linear layer of a bfloat16 model, the lm_head included when
    it is the embedding table, a float32 copy for `linear`, if the copies (twice the bfloat16 weights)
    take at most `max_memory_fraction` of physical memory; returns how many layers got one."""
    layers = [m for m in _unquantized_layers(model, with_lookup_tables=True)
              if not getattr(m, "used_for_lookup", False) or m is getattr(model, "lm_head", None)]
    extra = sum(4 * m.weight.numel() for m in layers)
    memory = physical_memory_bytes() or 0  # unknown: no copies
    if extra > max_memory_fraction * memory:
        log.info("no bfloat16 packing on this CPU; float32 copies of the linear weights (%.2f GiB) skipped: "
                 "more than %d%% of physical memory (%.1f GiB), so many-row matmuls run in emulated bfloat16",
                 extra / 2**30, round(100 * max_memory_fraction), memory / 2**30)
        return 0
    with torch.no_grad():
        for layer in layers:
            setattr(layer.weight, _FLOAT32_COPY, layer.weight.detach().float())
    log.info("no bfloat16 packing on this CPU: float32 copies of %d linear weights (%.2f GiB extra memory) "
             "for matmuls of %d rows or more", len(layers), extra / 2**30, FLOAT32_MIN_ROWS)
    return len(layers)
