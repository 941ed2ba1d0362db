"""GGUF blocks kept quantized: every block format decoded here against the gguf package's own
dequantization, bit for bit; tiny GGUF models in block formats served from their blocks (on the CPU
dequantized once at load, the codes path through the kernels' torch reference) against transformers
loading the same file; tensor types refused before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_checkpoint
from qwen_serve.kernels import quant_linear
from qwen_serve.layers.quantization import gguf as gguf_method
from qwen_serve.layers.quantization.gguf import BLOCK_FORMATS, FACTOR_RANGE
from test_loading import _tiny_vocab, write_tiny_gguf


@pytest.mark.parametrize("type_name", list(BLOCK_FORMATS))
def test_decode_matches_gguf_dequantize(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    fmt = BLOCK_FORMATS[type_name]
    generator = torch.Generator().manual_seed(len(type_name))
    raw = gguf_method.random_blocks(type_name, 6, 3 * fmt.block, generator).numpy()
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name])).float()
    ours = gguf_method.dequantize(torch.from_numpy(raw), type_name, (6, 3 * fmt.block))
    assert torch.equal(ours, theirs)
    codes, scales, mins, group, bits = gguf_method.decode(torch.from_numpy(raw), type_name)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits and group == fmt.group
    # Packed for the kernels and dequantized by their reference: the same numbers.
    packed = quant_linear.pack_codes(codes, bits)
    assert torch.equal(quant_linear.dequantize_reference(packed, mins, scales, group, bits), theirs)


def test_unknown_tensor_types_are_refused():
    with pytest.raises(ValueError, match="tensor model.layers.0.mlp.up_proj.weight has GGML type NOPE"):
        gguf_method.GGUFConfig.from_config({"tensor_types": {"model.layers.0.mlp.up_proj.weight": "NOPE"}}, "x")
    assert gguf_method.supported("Q4_1")  # the gguf package dequantizes it: served plain


# Per tensor of the tiny model: every block format, and a merged qkv / gate_up of mixed formats.
MIXED = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q5_0",
         "ffn_up": "Q8_0", "token_embd": "Q5_0", "output": "Q6_K"}


def _blocks(gname: str, arr: np.ndarray, types: dict[str, str] = MIXED):
    import gguf

    kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
    type_name = types.get(kind)
    if type_name is None or arr.shape[1] % BLOCK_FORMATS[type_name].block:  # the tiny ffn (528) stays F16
        return None
    if type_name in FACTOR_RANGE:  # the gguf package cannot quantize k-quants: random blocks of the shape
        generator = torch.Generator().manual_seed(zlib_crc(gname))
        return type_name, gguf_method.random_blocks(type_name, arr.shape[0], arr.shape[1], generator).numpy()
    return type_name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType[type_name])


def zlib_crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mixed")
    hf = make_tiny_checkpoint(tmp / "hf", heads=4, kv_heads=2, vocab=len(_tiny_vocab()[0]), hidden=256)
    return write_tiny_gguf(tmp / "mixed.gguf", hf, blocks=_blocks)


@pytest.mark.parametrize("keep_codes", [False, True], ids=["plain", "codes"])
def test_mixed_block_formats_match_transformers(mixed_gguf, keep_codes, monkeypatch, tmp_path):
    """Every block format in one model, q|k|v of three formats: our model from the blocks (plain on the CPU,
    or kept as codes through the kernels' torch reference) against transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    from qwen_serve.layers.attention import AttentionMetadata, forward_context
    from qwen_serve.loader.model_loader import load_model, load_model_config
    from qwen_serve.loader.resolve import resolve_model

    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_method.GGUFLinearMethod, "keeps_codes", staticmethod(lambda device: keep_codes))
    folder = resolve_model(str(mixed_gguf))
    types = json.loads((folder / "config.json").read_text())["quantization_config"]["tensor_types"]
    assert {types[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"} == {"Q4_K", "Q5_K", "Q6_K"}
    model = load_model(folder, load_model_config(folder), torch.float32, "cpu")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert hasattr(qkv, "qweight") == keep_codes and hasattr(qkv, "weight") != keep_codes
    # The input table is only looked up (the lm_head is its own tensor): it stays the file's blocks.
    assert model.model.embed_tokens.gguf_table[0] == "Q5_0" and hasattr(model.lm_head, "qweight") == keep_codes
    if keep_codes:  # three formats share 8-bit codes and groups of 16 (Q6_K's)
        assert qkv.scales.shape[1] == 256 // 16 and qkv.quant_method.bits == 8
    ids = [5, 77, 260, 3, 99, 200, 1, 42]
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
    ref_model = AutoModelForCausalLM.from_pretrained(str(mixed_gguf.parent), gguf_file=mixed_gguf.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_the_block_table_stays_mapped_from_the_file(mixed_gguf, tmp_path, monkeypatch):
    """The input table kept as blocks is the GGUF's own bytes, mapped (only looked-up rows' pages become
    resident), not a copy read into the heap."""
    from qwen_serve.loader.model_loader import load_model, load_model_config
    from qwen_serve.loader.resolve import resolve_model

    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    folder = resolve_model(str(mixed_gguf))
    model = load_model(folder, load_model_config(folder), torch.bfloat16, "cpu")
    table = model.model.embed_tokens.gguf_table[1]
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [tuple(int(a, 16) for a in m[0].split("-")) for m in maps if m[-1] == str(mixed_gguf.resolve())]
    assert any(lo <= table.data_ptr() and table.data_ptr() + table.nbytes <= hi for lo, hi in spans)


@pytest.mark.parametrize("kernels", [True, False], ids=["blocks", "planes"])
def test_a_wide_lm_head_on_the_cpu_runs_from_its_blocks_or_as_two_4bit_planes(tmp_path, monkeypatch, kernels):
    """An lm_head of Q8_0 blocks (the demo model's) in a bfloat16 model on the CPU: from its blocks through
    kernels/cpu_gguf.py, as the other block layers are, or where those kernels cannot be built, as two 4-bit
    planes through torch's int4 matmul; never a bfloat16 copy. Its logits stay within bfloat16's rounding of
    the float32 model's (the plain weights dequantized at load)."""
    import functools

    from qwen_serve.kernels import cpu_extension
    from qwen_serve.layers.attention import AttentionMetadata, forward_context
    from qwen_serve.loader.model_loader import load_model, load_model_config
    from qwen_serve.loader.resolve import resolve_model

    if kernels and not cpu_extension.available():
        pytest.skip("the GGUF CPU kernels cannot be built here")
    if not kernels:
        monkeypatch.setattr(cpu_extension, "available", lambda: False)
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    vocab = -(-len(_tiny_vocab()[0]) // 16) * 16  # the CPU's int4 packing takes outputs in 16s
    hf = make_tiny_checkpoint(tmp_path / "hf", heads=4, kv_heads=2, vocab=vocab, hidden=256)
    blocks = functools.partial(_blocks, types={**MIXED, "output": "Q8_0"})
    path = write_tiny_gguf(tmp_path / "q8.gguf", hf, blocks=blocks)
    folder = resolve_model(str(path))
    ids = [5, 77, 260, 3, 99, 200, 1, 42]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(folder, load_model_config(folder), dtype, "cpu")
        bf16 = dtype == torch.bfloat16
        assert hasattr(model.lm_head, "gguf_blocks") == (bf16 and kernels)
        assert hasattr(model.lm_head, "int4_high_weight") == (bf16 and not kernels)
        assert hasattr(model.lm_head, "weight") == (not bf16)
        # q|k|v of Q4_K, Q5_K, Q6_K from the blocks too, and the Q4_0 o_proj: 4-bit layers go to torch's int4
        # matmul only where the kernels cannot be built
        attention = model.model.layers[0].self_attn
        assert hasattr(attention.qkv_proj, "gguf_blocks") == (bf16 and kernels)
        assert hasattr(attention.o_proj, "gguf_blocks") == (bf16 and kernels)
        assert hasattr(attention.o_proj, "int4_weight") == (bf16 and not kernels)
        with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
            logits[dtype] = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
    ref = logits[torch.float32]
    assert ((logits[torch.bfloat16] - ref).norm() / ref.norm()).item() < 2e-2


def test_a_tied_table_on_the_cpu_is_looked_up_and_multiplied_from_its_blocks(tmp_path, monkeypatch):
    """No output tensor: the Q5_0 input table is also the lm_head. In a bfloat16 CPU model it keeps its blocks
    for both (rows looked up dequantized, logits through kernels/cpu_gguf.py), within bfloat16's rounding of the
    float32 model's logits."""
    from qwen_serve.kernels import cpu_extension
    from qwen_serve.layers.attention import AttentionMetadata, forward_context
    from qwen_serve.loader.model_loader import load_model, load_model_config
    from qwen_serve.loader.resolve import resolve_model

    if not cpu_extension.available():
        pytest.skip("the GGUF CPU kernels cannot be built here")
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    hf = make_tiny_checkpoint(tmp_path / "hf", heads=4, kv_heads=2, vocab=len(_tiny_vocab()[0]), hidden=256, tied=True)
    folder = resolve_model(str(write_tiny_gguf(tmp_path / "tied.gguf", hf, blocks=_blocks)))
    ids = [5, 77, 260, 3, 99, 200, 1, 42]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(folder, load_model_config(folder), dtype, "cpu")
        table = model.model.embed_tokens
        assert hasattr(table, "gguf_blocks") == (dtype == torch.bfloat16)
        with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
            logits[dtype] = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
    ref = logits[torch.float32]
    assert ((logits[torch.bfloat16] - ref).norm() / ref.norm()).item() < 2e-2


def test_misshaped_gguf_tensor_is_named(mixed_gguf, tmp_path, monkeypatch):
    from qwen_serve.loader import gguf_convert
    from qwen_serve.loader.model_loader import load_model, load_model_config
    from qwen_serve.loader.resolve import resolve_model

    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    folder = resolve_model(str(mixed_gguf))
    index = json.loads((folder / gguf_convert.GGUF_INDEX).read_text())
    entry = index["tensors"]["model.layers.1.self_attn.v_proj.weight"]
    entry["nbytes"] -= entry["shape"][0] * 210  # one Q6_K block a row fewer
    (folder / gguf_convert.GGUF_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.v_proj.weight' does not fit the config: Q6_K tensor"):
        load_model(folder, load_model_config(folder), torch.float32, "cpu")
