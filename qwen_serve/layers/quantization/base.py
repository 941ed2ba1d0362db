"""What every quantization method provides: a config parsed from the checkpoint, and a linear method.

A linear layer (layers/linear.py) never knows how its weight is stored. At construction it asks its
method to `create_weights`: parameters registered on the layer, each carrying how checkpoint tensors
are copied into it (`weight_loader`) and which of its dimensions run along the layer's outputs and
inputs (`output_dim`, `input_dim`, with `packed_dim` / `pack_factor` where several values share one
stored element), so the layer can place q/k/v or gate/up shards, and later tensor-parallel slices,
without knowing the format. At run time the layer calls `apply(layer, x, bias)`.
(The shape of vLLM's `QuantizeMethodBase.create_weights` / `apply`.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        """Registers the layer's parameters for `in_features` inputs and outputs made of the shards
        `output_sizes` (one entry for a plain linear; q, k, v or gate, up for merged ones)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[..., in_features] -> [..., out_features]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turns the loaded checkpoint layout into the one `apply` runs on (called once, on the device)."""

    def random_fill(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Random values for what the generic fill of random weights (loader/weights.random_weights) cannot
        make: a format whose tensors only exist as the checkpoint's bytes (GGUF's blocks)."""

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight in the compute dtype (a layer that is also an embedding table)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve embedding tables")


class QuantizationConfig(ABC):
    """One quantization method's settings, read from a checkpoint before any weight is."""

    name: str

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the linear layer named `prefix` (e.g. `model.layers.0.mlp.down_proj`)."""

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Refuses, before any weight is read, a device or dtype the method's kernels cannot run on."""

    def embedding_method(self, prefix: str) -> LinearMethod:
        """The method of the embedding table / lm_head named `prefix`: unquantized unless the format
        stores them quantized (GGUF)."""
        from qwen_serve.layers.quantization.unquantized import UnquantizedLinearMethod

        return UnquantizedLinearMethod()


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    """Copies a whole checkpoint tensor into a parameter of the same shape."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"expected shape {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def set_weight_attrs(param: nn.Parameter, **attrs: Any) -> nn.Parameter:
    for key, value in attrs.items():
        setattr(param, key, value)
    return param


def new_param(shape: tuple[int, ...], dtype: torch.dtype, weight_loader: Callable[..., None], **attrs: Any) -> nn.Parameter:
    """An uninitialised, frozen parameter with its loader and layout attributes."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    return set_weight_attrs(param, weight_loader=weight_loader, **attrs)
