"""Builds a model and fills it from one `(checkpoint name, tensor)` stream, whatever the file format.

Every format (HF safetensors folder, GGUF after conversion, hub snapshot) ends here, so the
name mapping, the shape checks and the "every parameter was loaded" check exist once.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from qwen_serve.models.config import Qwen2Config
from qwen_serve.models.qwen2 import Qwen2ForCausalLM, default_weight_loader

# Tensors some checkpoints carry that the model derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: Qwen2Config, dtype: torch.dtype, device: torch.device | str) -> Qwen2ForCausalLM:
    """An uninitialised model in `dtype` on `device`, allocated once (no float32 copy first)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_weights(model: Qwen2ForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies each checkpoint tensor into its (possibly fused) parameter; checks nothing is missing."""
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
            raise ValueError(f"checkpoint tensor {name!r} has no place in a Qwen2 model")
        try:
            if shard is None:
                default_weight_loader(param, tensor)
            else:
                model.get_submodule(target.rsplit(".", 1)[0]).load_shard(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r} does not fit the config: {e}") from None
        loaded.add(f"{target}#{shard}" if shard is not None else target)
    missing = [n for n in _expected_keys(model) if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing tensors: {shown}")


def _expected_keys(model: Qwen2ForCausalLM) -> list[str]:
    keys = []
    for name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if model.config.tie_word_embeddings and full == "lm_head.weight":
                continue
            shards = getattr(module, "shard_offsets", None)
            keys.extend(f"{full}#{s}" for s in shards) if shards else keys.append(full)
    return keys


def random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fills a model with random values in place (benchmarks of a shape without a checkpoint)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.device.type == "cpu":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.normal_(0.0, std)
