"""Triton for kernel modules that the CPU paths import too, or a stand-in where it is not installed.

torch's CPU wheel does not bring Triton, and int4pack.py / quant_linear.py / pdl.py hold each Triton kernel
beside its torch reference and the CPU path that layers/quantization uses. Without Triton they still import:
`triton.jit` (bare or with options) and `triton.constexpr_function` leave a kernel a plain function that is
never launched (CUDA paths need Triton, `layers.options.triton_available`), and `tl` is None (kernel bodies and
their `tl.constexpr` annotations, strings under `from __future__ import annotations`, are read only at launch).
"""

from __future__ import annotations

from typing import Any, Callable

try:
    import triton
    import triton.language as tl
except ImportError:

    class _NoTriton:
        @staticmethod
        def jit(fn: Callable | None = None, **options: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def constexpr_function(fn: Callable) -> Callable:
            return fn

    triton, tl = _NoTriton(), None

__all__ = ["triton", "tl"]
