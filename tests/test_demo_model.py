"""The demo model (Qwen2.5-Coder-0.5B-Instruct GGUF) through our conversion and model vs transformers
loading the same GGUF itself: same top-1 token at every position of three chat prompts.

Measured (2-core CPU, float32, transformers 5.23): max |Δlogit| = 4.8e-05 over the three prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.loader.model_loader import load_generation_config, load_model, load_model_config
from qwen_serve.loader.resolve import resolve_model
from qwen_serve.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.demo

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "用一句话介绍长城。",
    "Write a Python function that returns the n-th Fibonacci number.",
]
MAX_ABS_DIFF = 1e-3  # measured 4.8e-05; dequantization is exact in both, so only summation order differs


@pytest.fixture(scope="module")
def prompt_ids(demo_folder: Path) -> list[list[int]]:
    tok = Tokenizer.from_folder(demo_folder)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference_logits(demo_gguf: Path, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    """transformers' own GGUF load (its dequantization and Qwen2ForCausalLM), float32, once."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        out = [ref.eval()(torch.tensor([ids])).logits[0].float() for ids in prompt_ids]
    del ref
    return out


def test_demo_resolves_to_converted_folder(demo_folder: Path) -> None:
    assert resolve_model("demo") == demo_folder
    cfg = load_model_config(demo_folder)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (14, 2, 151936)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and not cfg.tie_word_embeddings
    assert load_generation_config(demo_folder)["eos_token_id"] == [151645, 151643]
    assert "<tool_call>" in json.loads((demo_folder / "tokenizer_config.json").read_text())["chat_template"]


def test_demo_logits_match_transformers_gguf(demo_folder: Path, prompt_ids, reference_logits) -> None:
    cfg = load_model_config(demo_folder)
    model = load_model(demo_folder, cfg, torch.float32, "cpu")
    ids = torch.tensor([t for p in prompt_ids for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompt_ids])
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(p) for p in prompt_ids])):
        ours = model.compute_logits(model(ids, positions))
    ref = torch.cat(reference_logits)
    assert ours.shape == ref.shape == (len(ids), 151936)
    max_diff = (ours - ref).abs().max().item()
    print(f"demo model vs transformers GGUF, {len(ids)} positions: max |Δlogit| = {max_diff:.2e}")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), "top-1 token differs at some position"
    assert max_diff < MAX_ABS_DIFF, f"max |Δlogit| = {max_diff}"
