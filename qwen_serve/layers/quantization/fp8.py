"""FP8 W8A8: float8_e4m3fn weights with a scale per output channel, activations quantized per token at
run time, multiplied by the FP8 tensor cores (kernels/fp8.py). Hopper only. One row (batch-1 decode) is
a weight read, where the scaled matmul is slower than bfloat16's GEMV: it takes the Triton GEMV on the float8
weight instead (kernels/fused.py), activations unquantized.

Where the weights come from:
- `--quantization fp8` on an unquantized checkpoint: its weights are quantized as they load (one scale per
  output row, its largest magnitude at 448).
- an FP8 checkpoint, `quant_method: "fp8"` (AutoFP8 / llm-compressor's layout: `weight` in F8_E4M3 and a
  per-tensor `weight_scale`, plus `input_scale` when `activation_scheme` is static) or
  `"compressed-tensors"` with an FP8 scheme (`weight_scale` per channel [N, 1] or per tensor). Per-tensor
  scales of merged shards (q|k|v, gate|up) become per-channel scales: each shard's rows keep their own.
  A static `input_scale` is used as the checkpoint says (the largest of merged shards', as vLLM does).
Block-wise scales (`weight_block_size`) and other compressed-tensors schemes are refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_serve.kernels import fp8
from qwen_serve.layers.quantization.base import LinearMethod, QuantizationConfig, new_param

SUPPORTED = ("--quantization fp8 on a bfloat16/float16 checkpoint", "quant_method 'fp8' with per-tensor scales",
             "compressed-tensors FP8 with per-channel or per-tensor weight scales and dynamic per-token or static "
             "per-tensor activations")


def _refuse(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what} is not supported; supported FP8 checkpoints: {'; '.join(SUPPORTED)}")


@dataclass(frozen=True, slots=True)
class Fp8Config(QuantizationConfig):
    serialized: bool  # the checkpoint stores float8 weights (else they are quantized as they load)
    static_activations: bool = False  # one input_scale per linear from the checkpoint (else per token)
    name = "fp8"

    @classmethod
    def from_config(cls, qc: dict[str, Any], source: str) -> "Fp8Config":
        if qc.get("weight_block_size"):
            raise _refuse(source, f"block-wise FP8 (weight_block_size {qc['weight_block_size']})")
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise _refuse(source, f"FP8 format {fmt!r}")
        scheme = str(qc.get("activation_scheme", "dynamic")).lower()
        if scheme not in ("dynamic", "static"):
            raise _refuse(source, f"activation_scheme {scheme!r}")
        _check_ignored(qc.get("ignored_layers") or [], source)
        return cls(serialized=True, static_activations=scheme == "static")

    @classmethod
    def from_compressed_tensors(cls, qc: dict[str, Any], source: str) -> "Fp8Config":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            raise _refuse(source, "compressed-tensors without config_groups")
        fmt = qc.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise _refuse(source, f"compressed-tensors format {fmt!r}")
        if qc.get("kv_cache_scheme"):
            raise _refuse(source, "a quantized KV cache (kv_cache_scheme)")
        schemes = set()
        for group in groups:
            w, a = group.get("weights") or {}, group.get("input_activations")
            desc = (f"weights {w.get('type')} {w.get('num_bits')}-bit by {w.get('strategy')}, activations "
                    + ("none" if not a else f"{a.get('type')} {a.get('num_bits')}-bit by {a.get('strategy')}"
                                            f"{' (dynamic)' if a.get('dynamic') else ''}"))
            weights_ok = (w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") in ("channel", "tensor")
                          and not w.get("dynamic") and w.get("symmetric", True))
            acts_ok = bool(a) and a.get("type") == "float" and a.get("num_bits") == 8 and (
                (a.get("dynamic") and a.get("strategy") == "token") or (not a.get("dynamic") and a.get("strategy") == "tensor"))
            if not (weights_ok and acts_ok) or "Linear" not in (group.get("targets") or []):
                raise _refuse(source, f"the compressed-tensors scheme ({desc}, targets {group.get('targets')})")
            schemes.add(bool(a.get("dynamic")))
        if len(schemes) > 1:
            raise _refuse(source, "compressed-tensors groups with both dynamic and static activations")
        _check_ignored(qc.get("ignore") or [], source)
        return cls(serialized=True, static_activations=not schemes.pop())

    def linear_method(self, prefix: str) -> LinearMethod:
        return Fp8LinearMethod(self)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
            raise ValueError(f"FP8 (--quantization fp8 or an FP8 checkpoint) needs an NVIDIA GPU of compute capability "
                             f"9.0 or later (Hopper: H100, H200) for its FP8 matmuls; this is {name}. Here, serve the "
                             "bfloat16 checkpoint, or an AWQ / GPTQ / GGUF one")
        if dtype != torch.bfloat16:
            raise ValueError(f"FP8 runs with --dtype bfloat16 (its matmuls write bfloat16), not {dtype}")


def _check_ignored(names: list[str], source: str) -> None:
    """Layers a checkpoint leaves unquantized: the lm_head (and embedding) always are here; a decoder
    linear left in bfloat16 inside an FP8 model is not served yet."""
    others = [n for n in names if not re.search(r"(lm_head|embed_tokens)$", str(n).removeprefix("re:"))]
    if others:
        raise _refuse(source, f"leaving layers unquantized ({', '.join(map(str, others[:3]))})")


class Fp8LinearMethod(LinearMethod):
    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        if not self.config.serialized:  # quantized in process_weights_after_loading
            layer.weight = new_param((n, in_features), params_dtype, layer.weight_loader, output_dim=0, input_dim=1)
            return
        layer.weight = new_param((n, in_features), fp8.FP8, layer.weight_loader, output_dim=0, input_dim=1)
        layer.weight_scale = new_param((n,), torch.float32, self._scale_loader(layer), output_dim=0)
        if self.config.static_activations:
            layer.input_scale = new_param((), torch.float32, _largest_scale_loader)

    @staticmethod
    def _scale_loader(layer: nn.Module):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
            """A per-channel scale ([N] or [N, 1]) goes in like any output-sharded tensor; a per-tensor one
            fills the rows of its shard (every row of this rank's slice)."""
            loaded = loaded.float().reshape(-1)
            if loaded.numel() != 1:
                return layer.weight_loader(param, loaded, shard)
            if (shard or "") not in layer.shard_offsets:
                raise ValueError(f"unknown shard {shard!r} (this layer has {layer.shard_names})")
            start, size = layer.shard_offsets[shard or ""]
            param.data[start:start + size] = loaded
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.config.serialized:
            weight, scale = fp8.quantize_weight(layer.weight.data)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if layer.weight.is_cuda and any(d % 16 for d in layer.weight.shape):
            raise ValueError(f"{layer.prefix}: FP8 matmuls need inputs and outputs in multiples of 16; this layer is "
                             f"{layer.weight.shape[0]} x {layer.weight.shape[1]}")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        input_scale = getattr(layer, "input_scale", None)
        if x.is_cuda and x.shape[0] == 1 and layer.fused:
            # Batch-1 decode reads the weight once: a GEMV with the activations in bfloat16 (no per-token
            # quantization, so a static input_scale does not clip here) is what reaches the memory bound.
            from qwen_serve.kernels import fused

            out = fused.gemv(x.contiguous(), layer.weight, bias, scale=layer.weight_scale)
        elif x.is_cuda:
            out = fp8.linear(x.contiguous(), layer.weight, layer.weight_scale, bias, input_scale, fused=layer.fused)
        else:
            out = fp8.linear_reference(x, layer.weight, layer.weight_scale, bias, input_scale)
        return out.reshape(*shape[:-1], out.shape[-1])


def _largest_scale_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    """One input scale for a merged layer: the largest of its shards' (none of their inputs saturates)."""
    value = loaded.float().reshape(-1)
    if value.numel() != 1:
        raise ValueError(f"input_scale must be one value (per-tensor), got shape {tuple(loaded.shape)}")
    first = not getattr(param, "loaded_once", False)
    param.data.copy_(value[0] if first else torch.maximum(param.data, value[0].to(param.device)))
    param.loaded_once = True
