"""Logit parity with transformers' Qwen2ForCausalLM on random-weight configs (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.loader.hf import iter_safetensors
from qwen_serve.loader.weights import build_model, load_weights
from qwen_serve.models.config import Qwen2Config

from conftest import make_tiny_checkpoint

TOLERANCE = 1e-4


def _ours(folder):
    cfg = Qwen2Config.from_file(folder / "config.json")
    model = build_model(cfg, torch.float32, "cpu")
    load_weights(model, iter_safetensors(folder))
    return model


def _reference(folder):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize(
    "heads,kv_heads,tied",
    [(4, 4, False), (4, 2, True), (14, 2, False), (7, 1, True)],
    ids=["gqa1-untied", "gqa2-tied", "gqa7-untied", "gqa7-tied"],
)
def test_logits_match_transformers(tmp_path, heads, kv_heads, tied):
    folder = make_tiny_checkpoint(tmp_path / "m", heads=heads, kv_heads=kv_heads, tied=tied, hidden=heads * 16)
    ours, ref = _ours(folder), _reference(folder)
    prompts = _prompts(ours.config.vocab_size, [1, 7, 33, 64])
    # All prompts in one flat batch: sequence boundaries come from the metadata alone.
    ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(p) for p in prompts])):
        logits = ours.compute_logits(ours(ids, positions))
    offset = 0
    for p in prompts:
        with torch.no_grad():
            expected = ref(p[None]).logits[0].float()
        got = logits[offset : offset + len(p)]
        offset += len(p)
        assert (got - expected).abs().max().item() <= TOLERANCE


def test_yarn_past_original_window_matches_transformers(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    folder = make_tiny_checkpoint(tmp_path / "y", yarn=yarn, max_pos=256)
    ours, ref = _ours(folder), _reference(folder)
    assert ours.config.rope_scaling is not None and ours.config.max_context == 256
    (prompt,) = _prompts(ours.config.vocab_size, [200])  # positions 64..199 lie past the original window
    with torch.no_grad():
        got = ours.compute_logits(ours(prompt, torch.arange(len(prompt))))
        expected = ref(prompt[None]).logits[0].float()
    assert (got - expected).abs().max().item() <= TOLERANCE
