"""Shared fixtures: tiny random-weight Qwen2 checkpoints built by transformers itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when several processes run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_checkpoint(
    folder: Path,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = False,
    yarn: dict | None = None,
    layers: int = 2,
    hidden: int = 64,
    vocab: int = 320,
    max_pos: int = 512,
    seed: int = 0,
) -> Path:
    """Saves a random Qwen2ForCausalLM with transformers' save_pretrained (float32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        rope_scaling=yarn,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 2,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # biases default to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return make_tiny_checkpoint(tmp_path / "tiny")
