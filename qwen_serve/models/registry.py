"""config.json's `architectures` -> the model class that serves it, imported on first use.

The loader asks here instead of naming a model family, so a new family is one file in models/ and
one line below. Qwen2 and the Llama family are one decoder (models/llama.py) whose differences are config
data; what a config does not say (Qwen2's biases on q, k and v) is said here.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "Qwen2ForCausalLM": ("qwen_serve.models.llama", "LlamaForCausalLM"),
    "LlamaForCausalLM": ("qwen_serve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("qwen_serve.models.llama", "LlamaForCausalLM"),
}
# config.json's `model_type` -> architecture, for configs that name no architecture
_MODEL_TYPES: dict[str, str] = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                "mistral": "MistralForCausalLM"}
# Architectures with biases on q, k and v whatever `attention_bias` says (Qwen2's configs do not say).
_QKV_BIAS = frozenset({"Qwen2ForCausalLM"})


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)


def resolve_architecture(raw: dict[str, Any], source: str = "config.json") -> str:
    """The first of the config's architectures that is served here; a clear error naming what is."""
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in _MODELS:
            return arch
    if archs:
        raise ValueError(f"{source}: architecture {archs} is not supported; qwen-serve serves {supported_architectures()}")
    model_type = raw.get("model_type")
    if model_type in (None, *_MODEL_TYPES):
        return _MODEL_TYPES.get(model_type, "Qwen2ForCausalLM")
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; qwen-serve serves {tuple(_MODEL_TYPES)}")


def qkv_bias_by_default(architecture: str) -> bool:
    return architecture in _QKV_BIAS


def model_class(architecture: str) -> type[nn.Module]:
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
