"""Logit parity with transformers' Qwen2ForCausalLM on random-weight configs (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.layers.attention import AttentionMetadata, OutputRows, bind_kv_cache, forward_context
from qwen_serve.loader.hf import iter_safetensors
from qwen_serve.loader.weights import build_model, load_weights
from qwen_serve.models.config import ModelConfig

from conftest import make_tiny_checkpoint

TOLERANCE = 1e-4


def _ours(folder):
    cfg = ModelConfig.from_file(folder / "config.json")
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


def _step(model, chunks: list[tuple[torch.Tensor, int, list[int]]], out_chunks: list[int] | None, block: int):
    """One cached step over (all token ids of a sequence, chunk start, block table) chunks, each running to
    the end of its ids: hidden states of every row, or only of the last row of the chunks `out_chunks`."""
    ids, positions, slots, starts, lens = [], [], [], [0], []
    for tokens, start, table in chunks:
        ids.append(tokens[start:])
        positions.extend(range(start, len(tokens)))
        slots.extend(table[p // block] * block + p % block for p in range(start, len(tokens)))
        starts.append(starts[-1] + len(tokens) - start)
        lens.append(len(tokens))
    width = max(len(t) for _, _, t in chunks)
    tables = torch.tensor([t + [0] * (width - len(t)) for _, _, t in chunks], dtype=torch.int32)
    meta = AttentionMetadata(starts, lens, torch.tensor(slots), tables, max(len(i) for i in ids), max(lens))
    to_device = lambda values, dtype: torch.tensor(values, dtype=dtype)  # noqa: E731
    rows = None if out_chunks is None else OutputRows.last_rows(meta, out_chunks, to_device)
    with torch.no_grad(), forward_context(meta):
        return model(torch.cat(ids), torch.tensor(positions), rows)


def test_output_rows_match_transformers(tmp_path):
    """The last layer computing only the rows that sample: a chunk after a cached prefix, a fresh prompt, a
    decode and a chunk that samples nothing in one step give transformers' last-token logits, and the
    rows equal those of the full forward pass. A step with no output row still caches its keys."""
    folder = make_tiny_checkpoint(tmp_path / "m", heads=14, kv_heads=2, hidden=224, layers=3)
    ours, ref = _ours(folder), _reference(folder)
    cfg, block = ours.config, 4
    cache = torch.zeros(2, cfg.num_hidden_layers, 40, block, cfg.num_key_value_heads, cfg.head_dim)
    bind_kv_cache(ours, cache)
    a, b, c, d = _prompts(cfg.vocab_size, [37, 9, 30, 13])
    table_a, table_b, table_c, table_d = list(range(0, 10)), list(range(10, 13)), list(range(13, 21)), [30, 22, 35, 23]
    # Step 1: a's first 24 tokens and d's first 12; nothing samples, so only their keys and values come out.
    none = _step(ours, [(a[:24], 0, table_a), (d[:12], 0, table_d)], [], block)
    assert none.shape == (0, cfg.hidden_size)
    # Step 2: a's rest over its cached prefix, b whole, c's first 16 tokens (no sample), d's last token.
    chunks = [(a, 24, table_a), (b, 0, table_b), (c[:16], 0, table_c), (d, 12, table_d)]
    full = _step(ours, chunks, None, block)
    only = _step(ours, chunks, [0, 1, 3], block)
    last_rows = [12, 12 + 9, 12 + 9 + 16 + 1]
    assert (only - full[last_rows]).abs().max().item() <= 1e-5
    logits = ours.compute_logits(only)
    for got, prompt in zip(logits, (a, b, d)):
        with torch.no_grad():
            expected = ref(prompt[None]).logits[0, -1].float()
        assert (got - expected).abs().max().item() <= TOLERANCE
