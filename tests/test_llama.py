"""Llama-architecture checkpoints (Llama 3 / 3.1 / 3.2, Yi-1.5, Mistral configs) on the decoder that serves
Qwen2: logits against transformers' own LlamaForCausalLM / MistralForCausalLM on tiny random models (float32,
CPU), greedy tokens through the engine, and a chat template of Llama 3's shape from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.loader.hf import iter_safetensors
from qwen_serve.loader.weights import build_model, load_weights
from qwen_serve.models.config import ModelConfig

TOLERANCE = 1e-4
VOCAB = 320


def make_llama_checkpoint(folder: Path, *, mistral: bool = False, tied: bool = False, rope_scaling: dict | None = None,
                          attention_bias: bool = False, mlp_bias: bool = False, head_dim: int | None = None,
                          sliding_window: int | None = None, max_pos: int = 512, seed: int = 0,
                          vocab: int = VOCAB) -> Path:
    """A random Llama (or Mistral) saved by transformers' save_pretrained (float32); weights scaled up so
    that greedy choices have clear margins, biases (when present) made non-zero."""
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_pos,
                  tie_word_embeddings=tied, rope_theta=10000.0, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    if mistral:
        cfg = transformers.MistralConfig(**common, sliding_window=sliding_window, head_dim=head_dim or 16)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, rope_scaling=rope_scaling, attention_bias=attention_bias,
                                       mlp_bias=mlp_bias, head_dim=head_dim)
        model = transformers.LlamaForCausalLM(cfg)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.mul_(8)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


CONFIGS = {
    "llama3.1-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama3.2-tied-head-dim": dict(tied=True, head_dim=32),
    "yi-biases": dict(attention_bias=True, mlp_bias=True),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(mistral=True),
}


def _reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ours(folder: Path):
    cfg = ModelConfig.from_file(folder / "config.json")
    model = build_model(cfg, torch.float32, "cpu")
    load_weights(model, iter_safetensors(folder))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    folder = make_llama_checkpoint(tmp_path / name, **CONFIGS[name])
    ours, ref = _ours(folder), _reference(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (1, 9, 200)]  # 200: past llama3's 64
    ids, positions = torch.cat(prompts), torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(p) for p in prompts])):
        logits = ours.compute_logits(ours(ids, positions))
    offset = 0
    for p in prompts:
        with torch.no_grad():
            expected = ref(p[None]).logits[0].float()
        scale = expected.abs().max().item()
        assert (logits[offset : offset + len(p)] - expected).abs().max().item() <= TOLERANCE * max(1.0, scale)
        offset += len(p)


def test_config_reads_each_family(tmp_path):
    qwen = ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8,
                                  "sliding_window": 16, "use_sliding_window": False})
    assert (qwen.qkv_bias, qwen.o_proj_bias, qwen.mlp_bias, qwen.sliding_window) == (True, False, False, None)
    llama = ModelConfig.from_file(make_llama_checkpoint(tmp_path / "l", **CONFIGS["llama3.1-rope"]) / "config.json")
    assert (llama.architecture, llama.qkv_bias, llama.rope_scaling.rope_type) == ("LlamaForCausalLM", False, "llama3")
    assert llama.max_context == 512  # Llama 3's scaling is already counted in max_position_embeddings
    yi = ModelConfig.from_file(make_llama_checkpoint(tmp_path / "y", **CONFIGS["yi-biases"]) / "config.json")
    assert (yi.qkv_bias, yi.o_proj_bias, yi.mlp_bias) == (True, True, True)


def test_mistral_sliding_window_bounds_the_context(tmp_path):
    """Full attention equals a sliding window's up to the window's length, so that is the longest context
    served (the engine refuses longer prompts with its usual message); logits inside it match."""
    folder = make_llama_checkpoint(tmp_path / "w", mistral=True, sliding_window=48)
    ours, ref = _ours(folder), _reference(folder)
    assert ours.config.max_context == 48
    prompt = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.compute_logits(ours(prompt, torch.arange(48)))
        expected = ref(prompt[None]).logits[0].float()
    assert (got - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("bad,match", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope scaling type 'dynamic' is not supported; "
                                                               r"supported: \('yarn', 'llama3', 'linear', 'freq_factors'\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "high_freq_factor > low_freq_factor"),
    ({"architectures": ["GPT2LMHeadModel"]}, r"architecture \['GPT2LMHeadModel'\] is not supported; qwen-serve "
                                             r"serves \('Qwen2ForCausalLM', 'LlamaForCausalLM', 'MistralForCausalLM'\)"),
])
def test_unsupported_configs_are_refused(bad, match):
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 8}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**base, **bad})


def test_engine_greedy_matches_transformers(tmp_path):
    """The whole engine (paged KV cache, chunked prefill, decode steps) on a Llama 3.1-style checkpoint."""
    from qwen_serve.config import EngineConfig
    from qwen_serve.engine.llm import LLM
    from qwen_serve.engine.llm_engine import LLMEngine
    from qwen_serve.engine.sampling_params import SamplingParams

    folder = make_llama_checkpoint(tmp_path / "e", **CONFIGS["llama3.1-rope"])
    ref = _reference(folder)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB - 2, (n,), generator=gen).tolist() for n in (5, 70, 33)]
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256,
                                    max_model_len=160, max_num_batched_tokens=32), folder)
    outs = LLM.from_engine(engine).generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                            use_tqdm=False)
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ids = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert list(out.outputs[0].token_ids) == ids[0, len(p):].tolist()


# A chat template of Llama 3's shape (its own BOS, header tokens, <|eot_id|>), written for this test.
LLAMA3_STYLE_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@pytest.fixture(scope="module")
def llama_chat_checkpoint(tmp_path_factory, demo_folder: Path) -> Path:
    """A tiny random Llama whose tokenizer is the demo's BPE with Llama 3's special tokens added and a
    post-processor that puts <|begin_of_text|> first (as Llama 3's tokenizer.json does), and the template above."""
    from tokenizers import AddedToken, Tokenizer, processors

    folder = tmp_path_factory.mktemp("llama_chat") / "model"
    tok = Tokenizer.from_file(str(demo_folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    model_vocab = -(-tok.get_vocab_size() // 64) * 64
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=model_vocab, max_position_embeddings=2048,
                                   bos_token_id=bos, eos_token_id=tok.token_to_id("<|eot_id|>"))
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_STYLE_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_llama_chat_template_and_bos_through_the_server(llama_chat_checkpoint: Path, tmp_path):
    """The checkpoint's template renders the chat with exactly one BOS (the template's; the tokenizer's own
    is not added again), a raw prompt gets the tokenizer's BOS as vLLM gives it, both as transformers'
    tokenizer does; a chat completion answers through the openai SDK, ending at <|eot_id|> or max_tokens."""
    import httpx
    import openai
    from transformers import AutoTokenizer

    from server_process import ServerProcess

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    theirs = AutoTokenizer.from_pretrained(llama_chat_checkpoint)
    expected_chat = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    bos = theirs.convert_tokens_to_ids("<|begin_of_text|>")
    assert expected_chat[0] == bos and expected_chat.count(bos) == 1
    proc = ServerProcess(llama_chat_checkpoint, tmp_path / "server.log", "--served-model-name", "llama")
    try:
        chat = httpx.post(f"{proc.base_url}/tokenize", json={"messages": messages}, timeout=60).json()
        assert chat["tokens"] == expected_chat
        prompt = httpx.post(f"{proc.base_url}/tokenize", json={"prompt": "Colours:"}, timeout=60).json()
        assert prompt["tokens"] == theirs("Colours:").input_ids and prompt["tokens"][0] == bos
        client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="llama", messages=messages, max_tokens=5, temperature=0)
        assert out.usage.prompt_tokens == len(expected_chat)
        assert out.choices[0].finish_reason in ("stop", "length")
        done = client.completions.create(model="llama", prompt="Colours:", max_tokens=3, temperature=0)
        assert done.usage.prompt_tokens == len(prompt["tokens"])
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def llama_cpp_rope_freqs(head_dim: int, base: float, s: dict) -> list[float]:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3.1's scaling: each frequency's divisor."""
    import math

    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            out.append(s["factor"])
        else:
            smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                      / (s["high_freq_factor"] - s["low_freq_factor"]))
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return out


@pytest.mark.parametrize("quantize", [False, True], ids=["f16", "q8_0"])
def test_llama_gguf_matches_its_source(tmp_path, monkeypatch, quantize):
    """A llama-architecture GGUF written as llama.cpp's converter writes one (q/k rows interleaved, Llama 3.1's
    scaling as rope_freqs, Llama 3's pre-tokenizer, BOS added) from a transformers model: F16 weights (the
    source rounded to float16 first) give the source's logits; Q8_0 blocks give transformers' own reading of
    the same GGUF (it undoes the interleave itself; that file has no rope scaling, which it does not read)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from qwen_serve.loader.resolve import resolve_model
    from qwen_serve.tokenizer.tokenizer import Tokenizer
    from test_loading import _tiny_vocab, write_tiny_gguf

    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    scaling = None if quantize else LLAMA31
    hf = make_llama_checkpoint(tmp_path / "hf", rope_scaling=scaling, vocab=len(_tiny_vocab()[0]), max_pos=256)
    weights = load_file(hf / "model.safetensors")
    save_file({k: v.half().float() for k, v in weights.items()}, hf / "model.safetensors", metadata={"format": "pt"})
    freqs = None if scaling is None else llama_cpp_rope_freqs(16, 10000.0, scaling)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, arch="llama", quantize=quantize, rope_freqs=freqs)
    from qwen_serve.loader.model_loader import load_model, load_model_config

    folder = resolve_model(str(path))
    ours = load_model(folder, load_model_config(folder), torch.float32, "cpu")
    assert ours.config.architecture == "LlamaForCausalLM"
    prompt = torch.randint(0, ours.config.vocab_size, (150,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([150])):
        got = ours.compute_logits(ours(prompt, torch.arange(150)))
        ref = (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32) if quantize
               else _reference(hf)).eval()
        expected = ref(prompt[None]).logits[0].float()
    assert (got - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item())
    tok = Tokenizer.from_folder(folder)
    assert tok.encode("hello", add_special_tokens=True)[0] == tok.bos_token_id


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece BPE vocabulary as Llama 2 / Mistral GGUFs hold one: <unk>, <s>, </s>, the 256
    byte pieces, '▁' and lowercase letters, then merged pieces, earlier ones scoring higher."""
    merged = ["▁t", "he", "▁the", "in", "▁in", "▁w", "or", "ld", "▁wor", "▁world", "ll", "▁h", "▁he", "llo",
              "▁hello", "er", "▁wh", "ere", "▁where", "▁a", "nd", "▁and"]
    singles = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + singles + merged
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(singles))] + [-float(i) for i in range(len(merged))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(singles) + len(merged))
    return tokens, scores, types


def test_sentencepiece_gguf_tokenizes_as_transformers_reads_it(tmp_path, monkeypatch):
    """A llama GGUF with a SentencePiece vocabulary (Llama 2, Mistral, Yi): the same ids as transformers'
    tokenizer made from the same file, BOS first, bytes without a piece spelled by <0xAB> pieces, and
    decoding gives the text back."""
    from transformers import AutoTokenizer

    from qwen_serve.loader.resolve import resolve_model
    from qwen_serve.tokenizer.tokenizer import Tokenizer
    from test_loading import write_tiny_gguf

    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    vocab = sentencepiece_vocab()
    hf = make_llama_checkpoint(tmp_path / "hf", vocab=len(vocab[0]))
    path = write_tiny_gguf(tmp_path / "spm.gguf", hf, arch="llama", sentencepiece=vocab)
    ours = Tokenizer.from_folder(resolve_model(str(path)))
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("hello world", "where the  world\nand in", "Héllo wörld 😀", "the end"):
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text).input_ids, text
        assert ids[0] == 1 and ours.decode(ids) == text
    piece = vocab[0].index
    assert ours.encode("hello world") == [piece("▁hello"), piece("▁world")]
    # A leading space: SentencePiece and llama.cpp put '▁' before the text whatever it starts with, so ' hello'
    # is '▁▁hello' (Llama 2's well-known lone '▁' token); transformers' converter adds none before a space.
    assert ours.encode(" hello") == [piece("▁"), piece("▁hello")] and ours.decode(ours.encode(" hello")) == " hello"
