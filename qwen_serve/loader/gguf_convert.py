"""Describes a qwen2- or llama-architecture GGUF file as an HF-style folder in the cache, once per file.

The weights stay in the GGUF: the folder holds what the rest of the engine reads from a Hugging Face
checkpoint, and an index of the file's tensors that `iter_gguf_weights` reads at load (plain reads or
maps at their offsets, no GGUF parsing, no converted copy):
  config.json             Qwen2ForCausalLM / LlamaForCausalLM hyperparameters from `qwen2.*` / `llama.*`
                          metadata, and a `gguf` quantization_config naming each weight's GGML type
                          (layers/quantization/gguf.py)
  gguf_tensors.json       HF name -> GGML type, shape, offset and length in the GGUF; the file's path and size
  tokenizer.json          byte-level BPE with the pre-tokenizer regex `tokenizer.ggml.pre` names (Qwen2's or
                          Llama 3's), vocab + merges + added tokens from `tokenizer.ggml.*` (CONTROL tokens
                          special, USER_DEFINED not), BOS added to raw text when the file says so
  tokenizer_config.json   special-token names and `tokenizer.chat_template`
  generation_config.json  bos / eos / pad ids (+ `general.sampling.*` defaults when the file has them)

A tensor type qwen-serve cannot read is refused here, before any weight is read. The folder is built
under a temporary name and renamed into place, so an interrupted conversion leaves no half cache.
llama.cpp's converter permutes the rows of q and k (and their biases) of llama-architecture models into
GGML's interleaved rotary layout, and not those of qwen2; the index marks the permuted tensors and
`iter_gguf_weights` puts their rows back in order (whole rows, so quantized blocks move unchanged). Llama
3.1's rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors, carried into config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
# Part of every cache folder's name: bump it when the converted layout changes, so old caches are
# not mistaken for current ones. 2: the weights stay in the GGUF (gguf_tensors.json).
CONVERTED_FORMAT = 2
GGUF_INDEX = "gguf_tensors.json"

# GGUF tensor names -> HF names ("{i}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED are added but not.
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# Tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp, `special_eog_ids`),
# beside the file's eos/eot/eom ids: for Qwen this adds <|endoftext|> to <|im_end|>, as Qwen's own
# generation_config.json does.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|eom_id|>")

# The pre-tokenizer split of Qwen2's tokenizer (transformers' Qwen2Tokenizer, llama.cpp's "qwen2").
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's (tiktoken's cl100k pattern): as Qwen2's, but digits go in runs of up to three.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex of that tokenizer.
_PRE_TOKENIZERS = {"qwen2": QWEN2_SPLIT_REGEX, "deepseek-r1-qwen": QWEN2_SPLIT_REGEX, "llama-bpe": LLAMA3_SPLIT_REGEX}
# general.architecture -> (HF architecture, model_type)
_ARCHITECTURES = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "llama": ("LlamaForCausalLM", "llama")}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))



_BYTE_TO_CHAR = _bytes_to_unicode()
_ALPHABET = frozenset(_BYTE_TO_CHAR.values())


def cache_root() -> Path:
    """Where converted models live: $QWEN_SERVE_CACHE, else ~/.cache/qwen-serve."""
    return Path(os.environ.get("QWEN_SERVE_CACHE") or Path.home() / ".cache" / "qwen-serve")


def file_key(path: Path) -> str:
    """A cheap identity of a file: size, mtime and a hash of its first and last MiB (header and tail)."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:20]


def converted_folder(root: Path, stem: str, key: str) -> Path:
    return root / "gguf" / f"{stem}-{key}-v{CONVERTED_FORMAT}"


def convert_gguf(path: str | Path, key: str | None = None, root: Path | None = None) -> Path:
    """The cached HF folder for a GGUF file, converting it first if needed. `key` overrides the
    file identity (the demo passes its verified sha256)."""
    path = Path(path).expanduser()
    _check_gguf_file(path)
    root = root or cache_root()
    target = converted_folder(root, path.stem, key or file_key(path))
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write_hf_folder(path, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_partials(target: Path, max_idle_s: float = 3600.0) -> None:
    """Deletes what killed conversions of this file left behind (unused, but gigabytes of disk).
    A partial folder whose files changed in the last hour may belong to a live conversion: kept."""
    now = time.time()
    for partial in target.parent.glob(f".{target.name}.*.partial"):
        try:
            newest = max([partial.stat().st_mtime] + [f.stat().st_mtime for f in partial.iterdir()])
        except OSError:  # removed meanwhile by its owner
            continue
        if now - newest > max_idle_s:
            shutil.rmtree(partial, ignore_errors=True)


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over `path`, with truncation and corruption turned into one clear error."""
    from gguf import GGUFReader

    _check_gguf_file(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails with numpy/struct/Value errors on cut or damaged files
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: truncated GGUF file: tensor {t.name} ends past the end of the file")
    return reader


def _metadata(reader, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            meta[name] = field.contents()
        except Exception as e:
            raise ValueError(f"{path}: corrupt metadata field {name!r} ({e})") from None
    return meta


def gguf_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """config.json for a qwen2 or llama GGUF (`tensor_shapes` by GGUF name, in HF order, [out, in])."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; qwen-serve reads GGUF files of "
                         f"{tuple(_ARCHITECTURES)}")

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks {full!r}")
        return meta[full]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    vocab = tensor_shapes["token_embd.weight"][0]
    architecture, model_type = _ARCHITECTURES[arch]
    cfg: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(need("context_length")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_shapes,  # llama.cpp drops output.weight when tied
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "yarn":
        cfg["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(meta[f"{arch}.rope.scaling.factor"]),
            "original_max_position_embeddings": int(
                meta.get(f"{arch}.rope.scaling.original_context_length", cfg["max_position_embeddings"])
            ),
        }
    elif scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (yarn, linear, or llama 3's rope_freqs)")
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[name] = int(meta[f"tokenizer.ggml.{key}"])
    return cfg


def _f32(value: Any) -> float:
    """GGUF stores float32: 1e-6 reads back as 9.99999997e-07. Take the shortest decimal that
    rounds to the same float32, which is what the original config.json said."""
    return float(str(np.float32(value)))


def _rope_freqs(reader, path: Path) -> list[float] | None:
    """Llama 3.1's scaling as llama.cpp stores it: `rope_freqs.weight`, what each frequency is divided by."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            if t.tensor_type.name != "F32":
                raise ValueError(f"{path}: rope_freqs.weight is {t.tensor_type.name}, not F32")
            return [float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1)]
    return None


def hf_tensor_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"{path}: tensor {gguf_name!r} has no place in a Qwen2 or Llama model")


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a config implies, with its shape ([out, in] for weights): Qwen2 has biases on q, k
    and v, Llama with `attention_bias` on o too."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = cfg["model_type"] == "llama" and cfg.get("attention_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
    return shapes


def write_hf_folder(path: Path, out: Path) -> None:
    """Writes config, tensor index, tokenizer and generation config of the GGUF at `path` into `out`."""
    from qwen_serve.layers.quantization import gguf as gguf_method

    reader = open_gguf(path)
    meta = _metadata(reader, path)
    # GGUF lists dimensions innermost first ([in, out]); torch/HF order is the reverse.
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    cfg = gguf_config(meta, shapes, path)
    freqs = _rope_freqs(reader, path)
    if freqs is not None:
        if len(freqs) != cfg["head_dim"] // 2:
            raise ValueError(f"{path}: rope_freqs.weight has {len(freqs)} values, not head_dim / 2 = {cfg['head_dim'] // 2}")
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "factor": 1.0, "freq_factors": freqs}
    wanted = expected_shapes(cfg)
    # Rows of q and k (weights and biases) that llama.cpp interleaved per head, and how many heads each has.
    permuted = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]} \
        if cfg["model_type"] == "llama" else {}
    index: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = hf_tensor_name(t.name, path)
        if name not in wanted:
            raise ValueError(f"{path}: tensor {t.name} ({name}) is not part of a model with this config")
        if shapes[t.name] != wanted[name]:
            raise ValueError(
                f"{path}: tensor {t.name} ({name}) has shape {list(shapes[t.name])}, but the metadata "
                f"implies {list(wanted[name])}"
            )
        type_name = t.tensor_type.name
        if not gguf_method.supported(type_name):
            raise ValueError(f"{path}: tensor {t.name} has GGML type {type_name}, which qwen-serve cannot read "
                             f"(nor can the installed gguf package dequantize it)")
        if len(wanted[name]) == 1 and type_name not in gguf_method.FLOAT_TYPES:
            raise ValueError(f"{path}: tensor {t.name} is a vector stored as {type_name}; only float vectors are read")
        index[name] = {"type": type_name, "shape": list(wanted[name]), "offset": int(t.data_offset),
                       "nbytes": int(t.n_bytes)}
        heads = permuted.get(name.split(".")[-2])
        if heads is not None:
            index[name]["interleaved_heads"] = heads
    missing = sorted(set(wanted) - set(index))
    if missing:
        raise ValueError(f"{path}: GGUF lacks tensors for {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    cfg["quantization_config"] = {"quant_method": "gguf",
                                  "tensor_types": {n: e["type"] for n, e in index.items() if len(e["shape"]) == 2}}
    _write_json(out / GGUF_INDEX, {"gguf": str(path.resolve()), "size": path.stat().st_size, "tensors": index})
    tokenizer, tok_config = build_tokenizer(meta, cfg, path)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "generation_config.json", generation_config(meta, tokenizer))
    _write_json(out / "config.json", cfg)  # written last: its presence marks a complete folder


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def iter_gguf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a folder made by `write_hf_folder`, read from its GGUF one tensor at a time: float
    tensors in their dtype and HF shape, block formats as their raw bytes, uint8 [rows, bytes a row].

    Float tensors are read with plain reads (as loader/model_loader.read_safetensors does: they are copied
    into the model, and a mapped file's touched pages would stay resident). Block tensors are mapped, each
    in its own map: a layer that decodes them drops its map once done, and an input table kept as the
    file's blocks (layers/quantization/gguf.py) stays mapped, so only the pages of rows looked up become
    resident (a Q5_0 table of 152K rows: ~2 KB a token of the vocabulary used, not 89 MiB)."""
    index = json.loads((folder / GGUF_INDEX).read_text())
    path = Path(index["gguf"])
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: its GGUF {path} is gone; pass the .gguf file again")
    if path.stat().st_size != index["size"]:
        raise ValueError(f"{path} changed since it was indexed into {folder}; pass the .gguf file again")
    with path.open("rb") as f:
        for name, e in sorted(index["tensors"].items(), key=lambda kv: kv[1]["offset"]):
            if e["offset"] + e["nbytes"] > index["size"]:
                raise ValueError(f"{path}: tensor {name} ends past the end of the file")
            if e["type"] in _FLOAT_DTYPES:
                buf = torch.empty(e["nbytes"], dtype=torch.uint8)
                f.seek(e["offset"])
                if f.readinto(memoryview(buf.numpy())) != e["nbytes"]:
                    raise ValueError(f"{path}: short read for tensor {name}")
                tensor = buf.view(_FLOAT_DTYPES[e["type"]]).reshape(e["shape"])
            else:  # copy-on-write: a private, writable view of the file's bytes
                mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=e["offset"], shape=(e["nbytes"],))
                tensor = torch.from_numpy(mapped).reshape(e["shape"][0], -1)
            if "interleaved_heads" in e:
                tensor = rotary_rows_in_order(tensor, e["interleaved_heads"])
            yield name, tensor


def rotary_rows_in_order(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's permutation of q/k rows: within each head, GGUF holds the rotary pairs interleaved
    (row 2i, 2i + 1 = dimensions i and i + d/2); HF's rotate-half layout has the halves one after another."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def build_tokenizer(meta: dict[str, Any], cfg: dict[str, Any], path: Path):
    """The `tokenizers.Tokenizer` and tokenizer_config.json a GGUF's tokenizer metadata describes: byte-level
    BPE ('gpt2': Qwen2, Llama 3) or SentencePiece BPE ('llama': Llama 2, Mistral, Yi)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return sentencepiece_tokenizer(meta, cfg, path)
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; qwen-serve reads byte-level BPE ('gpt2') "
                         f"and SentencePiece BPE ('llama') GGUF tokenizers")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(_PRE_TOKENIZERS)}")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not merges:
        raise ValueError(f"{path}: GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    # Byte-level vocabularies spell every byte as a printable stand-in; a token written in raw text
    # (rare mislabelled entries) is respelled so its bytes map the same way.
    vocab = {
        (tok if set(tok) <= _ALPHABET else "".join(_BYTE_TO_CHAR[b] for b in tok.encode("utf-8"))): i
        for i, tok in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    # No normalizer: llama.cpp applies none to byte-level BPE, and without one the round trip is exact.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None and 0 <= int(bos_id) < len(tokens):
        bos = tokens[int(bos_id)]  # raw text starts with BOS, as llama.cpp and Llama 3's tokenizer.json do
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, int(bos_id))]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [i for i, t in enumerate(types) if t == _TOKEN_CONTROL and set(tokens[i]) <= _ALPHABET]
    user = [i for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
    special = set(control)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

    def token_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return tok, _tokenizer_config(meta, cfg, tokens, special, control + user, {
        "tokenizer_class": "Qwen2Tokenizer" if pre != "llama-bpe" else "PreTrainedTokenizerFast",
        "bos_token": token_at("bos_token_id"),
        "eos_token": token_at("eos_token_id"),
        "pad_token": token_at("padding_token_id"),
        "unk_token": token_at("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
    })


def _tokenizer_config(meta: dict[str, Any], cfg: dict[str, Any], tokens: list[str], special: set[int] | list[int],
                      added: list[int], fields: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: `fields`, the added tokens (which are special) and the file's chat template."""
    config: dict[str, Any] = {
        **fields,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": i in special}
            for i in sorted(added)
        },
    }
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# llama.cpp's token types for SentencePiece vocabularies: 2 unknown, 3 control, 6 byte (<0xAB>).
_TOKEN_UNKNOWN, _TOKEN_BYTE = 2, 6
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def sentencepiece_merges(tokens: list[str], scores: list[float], usable: set[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: a piece is made by joining two pieces of the vocabulary, and pieces of
    higher score are made first (SentencePiece merges the best-scoring pair at each step). Each split of a
    piece into two known pieces is a merge ranked by the piece's score (ties by the parts' ids)."""
    ids = {tokens[i]: i for i in usable}
    ranked = []
    for i in usable:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def sentencepiece_tokenizer(meta: dict[str, Any], cfg: dict[str, Any], path: Path):
    """A SentencePiece BPE vocabulary ('llama' in GGUF: pieces, scores, types) as a `tokenizers` BPE with byte
    fallback: spaces become '▁', one is put before the text when `add_space_prefix` (default) says so, bytes
    with no piece are spelled by their <0xAB> tokens, and BOS starts raw text when `add_bos_token` says so."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    scores: list[float] = meta.get("tokenizer.ggml.scores") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError(f"{path}: GGUF lacks tokenizer.ggml.tokens, or its scores / token types do not match them")
    special = [i for i, t in enumerate(types) if t in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)]
    user = [i for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
    usable = {i for i, t in enumerate(types) if t not in (_TOKEN_CONTROL, _TOKEN_UNKNOWN, _TOKEN_USER_DEFINED, _TOKEN_BYTE)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, usable), unk_token=unk,
                               fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(_SPACE)] if prefix else [])
                                          + [normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

    def token_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token_at("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", True) and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok, _tokenizer_config(meta, cfg, tokens, special, special + user, {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": bos, "eos_token": token_at("eos_token_id"), "unk_token": unk,
        "pad_token": token_at("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
    })


def generation_config(meta: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    eos = [int(meta[f"tokenizer.ggml.{k}"]) for k in ("eos_token_id", "eot_token_id", "eom_token_id")
           if f"tokenizer.ggml.{k}" in meta]
    eos += [i for text in _EOG_TEXTS if (i := tokenizer.token_to_id(text)) is not None]
    gen: dict[str, Any] = {"eos_token_id": list(dict.fromkeys(eos))}
    for key, name in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            gen[name] = int(meta[f"tokenizer.ggml.{key}"])
    for key, name in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p")):
        if f"general.sampling.{key}" in meta:
            gen[name] = meta[f"general.sampling.{key}"]
    return gen


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
