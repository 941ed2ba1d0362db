"""Quantization methods, one file each, chosen by `--quantization` or the checkpoint's own config.

`quantization_config(requested, model_config, source)` reads and validates the method's settings
before any weight is read: an unknown method, bit width or group size is refused with a message
naming it and what is supported.
"""

from __future__ import annotations

from typing import Any

from qwen_serve.layers.quantization.awq import AWQConfig
from qwen_serve.layers.quantization.base import LinearMethod, QuantizationConfig
from qwen_serve.layers.quantization.gguf import GGUFConfig
from qwen_serve.layers.quantization.gptq import GPTQConfig

_METHODS: dict[str, type] = {"awq": AWQConfig, "gptq": GPTQConfig, "gguf": GGUFConfig}
QUANTIZATION_METHODS = tuple(_METHODS)

__all__ = ["QUANTIZATION_METHODS", "LinearMethod", "QuantizationConfig", "quantization_config", "release_config"]

# The quantization_config of Qwen's own -AWQ and -GPTQ-Int4 releases (for random weights of a shape).
_RELEASE_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}


def release_config(method: str) -> dict[str, Any]:
    if method not in _RELEASE_CONFIGS:
        raise ValueError(f"random weights can be made for {', '.join(_RELEASE_CONFIGS)}; {method} weights come "
                         "from a checkpoint (--model)")
    return dict(_RELEASE_CONFIGS[method])


def quantization_config(requested: str | None, model_config: dict[str, Any],
                        source: str = "config.json") -> QuantizationConfig | None:
    """The method `requested` (`--quantization`), or the one the checkpoint's `quantization_config`
    names when none is; None for an unquantized checkpoint."""
    qc = model_config.get("quantization_config")
    found = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else None
    if requested is not None and requested not in _METHODS:
        raise ValueError(f"--quantization {requested!r} is not supported; supported: {', '.join(QUANTIZATION_METHODS)}")
    if found is not None and found not in _METHODS:
        raise ValueError(f"{source}: quantization method {found!r} is not supported; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}")
    if requested is not None and found is not None and requested != found:
        raise ValueError(f"--quantization {requested} does not match the checkpoint's method {found!r} ({source})")
    if requested is not None and found is None:
        raise ValueError(f"--quantization {requested}: {source} has no quantization_config; the checkpoint is not "
                         f"{requested}-quantized")
    if found is None:
        return None
    return _METHODS[found].from_config(qc, source)
