"""Quantization methods, one file each, chosen by `--quantization` or the checkpoint's own config.

`quantization_config(requested, model_config, source)` reads and validates the method's settings
before any weight is read: an unknown method, bit width or group size is refused with a message
naming it and what is supported.
"""

from __future__ import annotations

from typing import Any, Callable

from qwen_serve.layers.quantization.awq import AWQConfig
from qwen_serve.layers.quantization.base import LinearMethod, QuantizationConfig
from qwen_serve.layers.quantization.fp8 import Fp8Config
from qwen_serve.layers.quantization.gguf import GGUFConfig
from qwen_serve.layers.quantization.gptq import GPTQConfig

# quant_method -> its config's parser.
_METHODS: dict[str, Callable[[dict[str, Any], str], QuantizationConfig]] = {
    "awq": AWQConfig.from_config, "gptq": GPTQConfig.from_config, "gguf": GGUFConfig.from_config,
    "fp8": Fp8Config.from_config, "compressed-tensors": Fp8Config.from_compressed_tensors,
}
QUANTIZATION_METHODS = tuple(_METHODS)
# Methods `--quantization` applies to an unquantized checkpoint as it loads; and the checkpoint methods
# each of them also accepts (vLLM's --quantization fp8 serves a compressed-tensors FP8 checkpoint too).
_AT_LOAD = {"fp8": lambda: Fp8Config(serialized=False)}
_ALSO_ACCEPTS = {"fp8": ("compressed-tensors",)}
AT_LOAD_METHODS = tuple(_AT_LOAD)

__all__ = ["QUANTIZATION_METHODS", "AT_LOAD_METHODS", "LinearMethod", "QuantizationConfig", "quantization_config",
           "release_config"]

# The quantization_config of Qwen's own -AWQ and -GPTQ-Int4 releases (for random weights of a shape).
_RELEASE_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "gguf": {"quant_method": "gguf", "tensor_types": {}, "random_type": "Q4_K"},  # Q4_K_M's main format
}


def release_config(method: str) -> dict[str, Any]:
    if method not in _RELEASE_CONFIGS:
        raise ValueError(f"random codes can be made for {', '.join(_RELEASE_CONFIGS)} (and random weights quantized at "
                         f"load for {', '.join(_AT_LOAD)}); {method} weights come from a checkpoint (--model)")
    return dict(_RELEASE_CONFIGS[method])


def quantization_config(requested: str | None, model_config: dict[str, Any],
                        source: str = "config.json") -> QuantizationConfig | None:
    """The method `requested` (`--quantization`), or the one the checkpoint's `quantization_config`
    names when none is; None for an unquantized checkpoint that none is requested for."""
    qc = model_config.get("quantization_config")
    found = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else None
    if requested is not None and requested not in _METHODS:
        raise ValueError(f"--quantization {requested!r} is not supported; supported: {', '.join(QUANTIZATION_METHODS)}")
    if found is not None and found not in _METHODS:
        raise ValueError(f"{source}: quantization method {found!r} is not supported; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}")
    if requested is not None and found is not None and found not in (requested, *_ALSO_ACCEPTS.get(requested, ())):
        raise ValueError(f"--quantization {requested} does not match the checkpoint's method {found!r} ({source})")
    if requested is not None and found is None:
        if requested in _AT_LOAD:
            return _AT_LOAD[requested]()
        raise ValueError(f"--quantization {requested}: {source} has no quantization_config; the checkpoint is not "
                         f"{requested}-quantized (methods applied at load: {', '.join(_AT_LOAD)})")
    if found is None:
        return None
    return _METHODS[found](qc, source)
