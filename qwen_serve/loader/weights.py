"""Builds a model and fills it from one `(checkpoint name, tensor)` stream, whatever the file format.

Every format (HF safetensors folder, GGUF, hub snapshot) ends here, so the name mapping, the shape
checks and the "every parameter was loaded" check exist once. Each parameter is filled by its own
`weight_loader` (the layer's, which places q/k/v and gate/up shards; quantized parameters included),
then each layer's linear method turns what was loaded into what it computes on.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.quantization.base import default_weight_loader
from qwen_serve.models.config import ModelConfig
from qwen_serve.models.registry import model_class

# Tensors some checkpoints carry that the model derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                opts: LayerOptions | None = None) -> nn.Module:
    """An uninitialised model of the config's architecture, its parameters allocated once on `device`
    (quantized ones in their storage dtype, the rest in `dtype`)."""
    with torch.device(device):
        model = model_class(cfg.architecture)(cfg, opts or LayerOptions(), dtype)
    return model.eval()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies each checkpoint tensor into its (possibly fused) parameter; checks nothing is missing;
    then lets every layer's method prepare its loaded weights."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    tied = model.config.tie_word_embeddings
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard = name, None
        for ckpt_part, (fused_part, shard_id) in model.packed_modules_mapping.items():
            if f".{ckpt_part}." in name:
                target, shard = name.replace(f".{ckpt_part}.", f".{fused_part}."), shard_id
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in a {model.config.architecture} model "
                             "with this config and quantization")
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                default_weight_loader(param, tensor)
            elif shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r} does not fit the config: {e}") from None
        loaded.add(f"{target}#{shard}" if shard is not None else target)
    missing = [n for n in _expected_keys(model) if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing tensors: {shown}")
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def _expected_keys(model: nn.Module) -> list[str]:
    keys = []
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if model.config.tie_word_embeddings and full.startswith("lm_head."):
                continue
            shards = getattr(module, "shard_names", None)
            keys.extend(f"{full}#{s}" for s in shards) if shards else keys.append(full)
    return keys


def random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fills a model with random values in place (benchmarks of a shape without a checkpoint), then lets
    each layer's method prepare them as after a load. Quantized layers get random codes and zero points
    (every bit pattern is valid), scales that give weights of about `std`, and in-order groups."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("g_idx"):
                groups = model.get_submodule(name.rsplit(".", 1)[0]).scales.shape[0]
                p.copy_(torch.arange(p.shape[0], device=p.device) // (p.shape[0] // groups))
            elif not p.dtype.is_floating_point:
                info = torch.iinfo(p.dtype)
                p.copy_(torch.randint(info.min, info.max, p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith("scales"):  # codes minus zero points spread over about +-8 steps
                p.copy_((torch.rand(p.shape, generator=gen) * std / 4 + std / 8).to(p.dtype))
            elif p.device.type == "cpu":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.normal_(0.0, std)
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.random_fill(module, gen)
                method.process_weights_after_loading(module)
