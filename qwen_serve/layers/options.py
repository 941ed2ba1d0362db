"""What every layer of a model is built with: the quantization config, the fused-kernel choice and the
tensor-parallel rank.

The model passes one `LayerOptions` to each layer it builds; a layer decides its kernels from it and
from its input's device, never from the environment. With `fused_kernels` (the default) CUDA inputs
go to the Triton kernels in `qwen_serve.kernels` where Triton imports, and CPU inputs to the C++ ones
where those build (a decode step's attention, RMSNorm: kernels/cpu_attention.py, cpu_norm.py);
the torch code each kernel replaces stays in its layer and is the reference the tests compare against.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING

from qwen_serve.distributed.parallel import ParallelContext

if TYPE_CHECKING:
    from qwen_serve.layers.quantization.base import QuantizationConfig


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # an import hook refusing it, or a module entry without a spec
        return False


@dataclass(frozen=True, slots=True)
class LayerOptions:
    quant_config: "QuantizationConfig | None" = None
    fused_kernels: bool = True
    parallel: ParallelContext = field(default_factory=ParallelContext)  # size 1: the whole model

    @property
    def fused(self) -> bool:
        """Whether CUDA inputs take the Triton kernels (asked per call together with `x.is_cuda`)."""
        return self.fused_kernels and triton_available()
