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


# -- the demo model (Qwen2.5-Coder-0.5B-Instruct GGUF from the `demo` extra) -----------------------
# Converted once into the user's qwen-serve cache ($QWEN_SERVE_CACHE or ~/.cache/qwen-serve), so
# later test sessions reuse it (first conversion ~20 s on 2 cores).


@pytest.fixture(scope="session")
def demo_folder() -> Path:
    """The converted demo model folder (config.json, model.safetensors, tokenizer files)."""
    from qwen_serve.loader.demo import demo_model_folder

    return demo_model_folder()


@pytest.fixture(scope="session")
def tok(demo_folder: Path):
    """Our tokenizer of the demo model."""
    from qwen_serve.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_folder(demo_folder)


@pytest.fixture(scope="session")
def vocab(demo_folder: Path) -> int:
    """The logits width of the demo model (grammar masks must cover it: wider than the tokenizer's ids)."""
    import json

    return json.loads((demo_folder / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The assembled, sha256-verified demo GGUF file (for transformers' own GGUF loading)."""
    from qwen_serve.loader.demo import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def hf_demo_tokenizer(demo_gguf: Path):
    """transformers' tokenizer built from the GGUF itself: independent of our conversion (~20 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name)


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, demo_folder: Path) -> Path:
    """A tiny random Qwen2 whose vocabulary is the demo tokenizer's, with the demo's tokenizer.json,
    tokenizer_config.json (chat template) and generation_config.json, so text prompts and chat work."""
    import json
    import shutil

    model_vocab = json.loads((demo_folder / "config.json").read_text())["vocab_size"]
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_chat") / "model", vocab=model_vocab, max_pos=4096)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_folder / name, folder / name)
    return folder
