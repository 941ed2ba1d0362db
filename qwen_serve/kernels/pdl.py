"""Programmatic dependent launch (PDL, compute capability 9.0+) for our Triton kernels.

A batch-1 decode step is ~280 short kernels; between two of them the GPU drains one grid and only
then starts launching the next. With PDL a kernel's programs are launched while the kernel before
it on the stream is still finishing, and wait inside (`wait_for_previous`) until it has completed and
its writes are visible. CUDA graphs keep the launch attribute (the edge becomes programmatic).

The rule each kernel launched this way follows: before `wait_for_previous` it may read only what no
kernel writes (weights), and it calls `wait_for_previous` in every program, before any other
load or any store: a kernel that could finish without waiting would let the next one start before
the kernels before it have finished. Torch and cuBLAS kernels launch normally and wait in full.

QWEN_SERVE_PDL=0 turns it off (A/B measurements).
"""

from __future__ import annotations

import functools
import os

import torch

from qwen_serve.kernels.triton_or_none import tl, triton


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL."""
    if device.type != "cuda" or os.environ.get("QWEN_SERVE_PDL", "1") == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the kernel's USE_PDL switch and Triton's launch option."""
    on = enabled(device)
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Waits until the previous kernel on the stream has completed, then lets the next one launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
