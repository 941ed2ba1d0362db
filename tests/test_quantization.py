"""AWQ and GPTQ checkpoints: the formats' packing against references nobody here wrote, tiny models in
each format against transformers running the dequantized weights, and bad input refused early.

Tolerance of the logit comparisons: both sides compute in float32 with the very same weights (a 4- or
8-bit code difference times a float16 scale is exact in float32), so only the order of the sums differs:
1e-4 on logits of magnitude ~1 (measured ~1e-6).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.layers.quantization import awq, gptq, quantization_config
from qwen_serve.layers.options import LayerOptions
from qwen_serve.loader.model_loader import load_model, load_model_config

from quant_checkpoints import make_quantized_checkpoint, quantize_awq, quantize_gptq

LOGIT_TOL = 1e-4


def _autoawq_packing_utils():
    """AutoAWQ's own unpacking (awq/utils/packing_utils.py, which needs only torch), loaded by path so
    that the rest of the deprecated package is not imported."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("AutoAWQ is not installed: it comes with the test extra (pip install -e '.[test]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_dequantize_matches_autoawq(group_size):
    ref = _autoawq_packing_utils()
    assert tuple(ref.AWQ_ORDER) == awq.AWQ_ORDER
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(group_size))  # HF [N, K]
    tensors, deq = quantize_awq(w, group_size)
    theirs = ref.dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, group_size)  # [K, N]
    ours = awq.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)
    assert torch.equal(ours.half(), theirs)  # theirs computes in float16: the same values, rounded
    assert torch.equal(ours, deq.t())  # and ours exactly what the codes stand for


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (-1, False)])
@pytest.mark.parametrize("sym,v1", [(False, True), (True, True), (False, False)])
def test_gptq_dequantize_matches_published_packing(bits, group_size, desc_act, sym, v1):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits + group_size))
    tensors, deq = quantize_gptq(w, bits, group_size, desc_act, sym, v1)
    ours = gptq.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits,
                           1 if v1 else 0)
    assert torch.equal(ours, deq.t())


def _logits(folder: Path, dtype=torch.float32) -> torch.Tensor:
    cfg = load_model_config(folder)
    quant = quantization_config(None, cfg.raw, str(folder))
    model = load_model(folder, cfg, dtype, "cpu", LayerOptions(quant_config=quant))
    ids = torch.arange(3, 40)
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
        return model.compute_logits(model(ids, torch.arange(len(ids))))


def _transformers_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40)[None]).logits[0]


CASES = {
    "awq-g32": dict(method="awq", group_size=32),
    "awq-g128-tied": dict(method="awq", group_size=128, tied=True),
    "gptq-4bit-g32": dict(method="gptq", bits=4, group_size=32),
    "gptq-4bit-desc_act-sym": dict(method="gptq", bits=4, group_size=64, desc_act=True, sym=True),
    "gptq-8bit-g128-v2": dict(method="gptq", bits=8, group_size=128, v1=False),
    "gptq-8bit-per-channel": dict(method="gptq", bits=8, group_size=-1),
    "awq-g64-llama": dict(method="awq", group_size=64, llama=True),
    "gptq-4bit-desc_act-llama": dict(method="gptq", bits=4, group_size=32, desc_act=True, llama=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def quantized(request, tmp_path_factory) -> tuple[Path, Path]:
    return make_quantized_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])


def test_tiny_quantized_model_matches_transformers_on_dequantized_weights(quantized):
    q_folder, deq_folder = quantized
    ours, ref = _logits(q_folder), _transformers_logits(deq_folder)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < LOGIT_TOL


def _greedy(folder: Path, **config) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(folder), block_size=4, max_model_len=128, **config), folder)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, n in enumerate((20, 7, 33)):
        engine.add_request(str(i), list(range(5, 5 + n)), params)
    out = {}
    while engine.has_unfinished_requests():
        out.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [out[str(i)] for i in range(3)]


def test_engine_serves_quantized_checkpoint_as_detected(quantized):
    """The engine finds the method in config.json by itself; greedy tokens equal the dequantized model's."""
    q_folder, deq_folder = quantized
    cpu = dict(dtype="float32", device="cpu", num_kv_blocks=64)
    tokens = _greedy(q_folder, **cpu)
    assert tokens == _greedy(deq_folder, **cpu) and all(len(t) == 6 for t in tokens)


def test_bfloat16_quantized_model_stays_close(quantized):
    """bfloat16 activations (the CPU default) on the same checkpoint: within bfloat16's rounding. Layers in
    groups torch's CPU int4 matmul takes run through it (scales and zeros in bfloat16), 8-bit ones as two
    4-bit planes."""
    from qwen_serve.kernels import int4pack

    q_folder, _ = quantized
    ours32, ours16 = _logits(q_folder), _logits(q_folder, torch.bfloat16)
    assert ((ours16 - ours32).norm() / ours32.norm()).item() < 2e-2
    qc = json.loads((q_folder / "config.json").read_text())["quantization_config"]
    cfg = load_model_config(q_folder)
    model = load_model(q_folder, cfg, torch.bfloat16, "cpu")
    layers = [m for m in model.modules() if hasattr(m, "input_perm")]
    for m in layers:
        group = m.in_features if qc["group_size"] == -1 else qc["group_size"]
        takes = int4pack.supported(group, m.in_features, m.out_features, torch.bfloat16,
                                   torch.device("cpu"))
        assert hasattr(m, "int4_weight") == takes and hasattr(m, "int4_high_weight") == (takes and qc["bits"] == 8)
    assert layers


def test_int4pack_mm_config_fits_the_kernel(monkeypatch):
    """The CUDA tensor-core kernel's settings for every row count it serves, on the 7B's and the demo's layer
    shapes: blocks Triton lowers to tensor-core tiles (128 x 256 accumulators only with 8 warps), K split in
    powers of two into no more pieces than it has k-tiles, and split only where the grid alone would leave
    multiprocessors idle."""
    from qwen_serve.kernels import int4pack

    monkeypatch.setattr(int4pack, "_multiprocessors", lambda index: 132)
    shapes = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (1152, 896), (9728, 896), (896, 4864)]
    for m in range(2, int4pack.MM_ROWS_MAX + 1):
        for n, k in shapes:
            block_m, block_n, warps, split = int4pack.mm_config(m, n, k, 4, torch.device("cuda", 0))
            assert block_m in (16, 32, 64, 128, 256) and (block_m >= m or block_m == 128)
            assert block_n in (64, 128) and warps in (4, 8) and not (block_m * block_n > 128 * 128 and warps == 4)
            assert split & (split - 1) == 0 and 1 <= split <= min(8, k // 128)
            assert split == 1 or -(-n // block_n) * -(-m // block_m) < 132 * 8


def test_int4pack_cpu_packing_in_slices_is_the_whole(monkeypatch):
    """The CPU packer's slices of CPU_PACK_ROWS rows joined are the weight packed at once (uint8 codes in)."""
    from qwen_serve.kernels import int4pack

    codes = torch.randint(0, 16, (64 * 5 + 16, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    zeros, scales = torch.zeros(codes.shape[0], 2), torch.ones(codes.shape[0], 2)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    monkeypatch.setattr(int4pack, "CPU_PACK_ROWS", 64)
    assert torch.equal(int4pack.pack(codes, zeros, scales, torch.bfloat16)[0], whole)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_int4pack_cuda_layout_round_trip(inner_k_tiles):
    """The CUDA layout written out in torch (what the GPU kernels are tested on in Triton's interpreter):
    layout_reference and dequantize_reference undo each other, and nibble i + 4 h of output a's word 4 j + b of a
    tile holds output a, input 32 j + 8 i + 2 b + h of it (tests/gpu checks both against torch's packing)."""
    from qwen_serve.kernels import int4pack

    n, k = 24, 16 * inner_k_tiles * 3
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(inner_k_tiles))
    packed = int4pack.layout_reference(codes, inner_k_tiles)
    assert packed.shape == (3, 3, 32, inner_k_tiles // 2) and packed.dtype == torch.int32
    unit = torch.stack([torch.ones(1, n), torch.full((1, n), 8.0)], dim=-1)
    assert torch.equal(int4pack.dequantize_reference(packed, unit, k), codes.float())
    for nt, kt, a, b, j, i, h in [(0, 0, 0, 0, 0, 0, 0), (2, 1, 7, 3, inner_k_tiles // 2 - 1, 3, 1), (1, 2, 4, 1, 0, 2, 1)]:
        word = int(packed[nt, kt].reshape(8, -1)[a, 4 * j + b]) & 0xFFFFFFFF
        assert (word >> (4 * (i + 4 * h))) & 15 == codes[8 * nt + a, 16 * inner_k_tiles * kt + 32 * j + 8 * i + 2 * b + h]


@pytest.mark.parametrize("bits,symmetric", [(5, True), (6, True), (8, True), (5, False), (8, False)])
def test_wide_codes_run_as_two_4bit_planes(bits, symmetric):
    """On the CPU, codes of 5-8 bits (GGUF's Q5_0 / Q8_0 / Q5_K, GPTQ-Int8) are split into two 4-bit planes
    for torch's int4 matmul. The planes' weights add up to the codes' (float32); symmetric formats (minimum
    2**(bits-1) scales) leave the low plane a zero of 8 scales, exact in bfloat16; through the matmul in
    bfloat16 the result is within bfloat16's rounding of the float32 reference."""
    from torch import nn

    from qwen_serve.layers.quantization.packed import PackedIntMethod, repack, split_planes

    g = torch.Generator().manual_seed(bits)
    n, k, group = 64, 256, 32
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    scales = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).half().float()
    mins = 2 ** (bits - 1) * scales if symmetric else torch.rand(n, k // group, generator=g) * 0.1
    exact = codes.float() * scales.repeat_interleave(group, 1) - mins.repeat_interleave(group, 1)
    planes = split_planes(codes, mins, scales, bits)
    summed = sum((c.float() - 8) * sc.repeat_interleave(group, 1) + (8 * sc - z).repeat_interleave(group, 1)
                 for c, z, sc in planes)
    torch.testing.assert_close(summed, exact, rtol=0, atol=1e-6)
    assert all(c.min() >= 0 and c.max() <= 15 for c, _, _ in planes)
    if symmetric:
        assert torch.equal(8 * planes[0][2] - planes[0][1], 8 * scales)  # the low plane's zero
        assert torch.equal(8 * planes[1][2] - planes[1][1], torch.zeros_like(scales))  # the high plane's
    layer = nn.Module()
    repack(layer, codes, mins, scales, bits, int4_dtype=torch.bfloat16)
    assert hasattr(layer, "int4_weight") and hasattr(layer, "int4_high_weight")
    x = torch.randn(3, k, generator=g)
    out = PackedIntMethod(bits).apply(layer, x.bfloat16(), None)
    ref = x @ exact.t()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("k,group", [(48, 48), (64, 16)])
def test_codes_that_do_not_fill_the_kernels_chunks_are_refused(k, group):
    """The packed layout holds 4-bit codes in chunks of 32 inputs: K and the group size must be whole chunks
    (every supported AWQ / GPTQ group and GGUF block is); otherwise repacking names the layer."""
    from torch import nn

    from qwen_serve.layers.quantization.packed import repack

    layer = nn.Module()
    layer.prefix = "model.layers.0.mlp.down_proj"
    codes = torch.randint(0, 16, (8, k), dtype=torch.int32)
    with pytest.raises(ValueError, match=f"model.layers.0.mlp.down_proj: 4-bit codes are packed in chunks of 32 "
                                         f"inputs; {k} inputs in groups of {group} are not whole chunks"):
        repack(layer, codes, torch.zeros(8, k // group, dtype=torch.uint8), torch.ones(8, k // group), 4)


# ---- bad input: refused before any weight is read, naming what is wrong and what is supported ----

@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 3, "group_size": 128}, "AWQ with 3 bits is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 16}, r"AWQ group size 16 is not supported; supported: \(32, 64, 128\)"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, r"GPTQ with 3 bits is not supported; supported: \(4, 8\)"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, "GPTQ group size 100 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint format 'marlin'"),
    ({"quant_method": "bitsandbytes"}, "quantization method 'bitsandbytes' is not supported; supported: awq, gptq"),
])
def test_unsupported_quantization_is_refused(qc, match):
    with pytest.raises(ValueError, match=match):
        quantization_config(None, {"quantization_config": qc})


def test_quantization_flag_must_match_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="--quantization gptq does not match the checkpoint's method 'awq'"):
        quantization_config("gptq", {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}})
    with pytest.raises(ValueError, match="has no quantization_config"):
        quantization_config("awq", {})
    with pytest.raises(ValueError, match="--quantization 'int3' is not supported"):
        EngineConfig(quantization="int3")
    assert quantization_config(None, {}) is None


def test_refused_before_weights_are_read(quantized, monkeypatch):
    """A bad quantization_config fails before the loader opens a weight file."""
    from qwen_serve.loader import model_loader

    q_folder, _ = quantized
    config = json.loads((q_folder / "config.json").read_text())
    bad = q_folder.parent / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "model.safetensors").write_bytes((q_folder / "model.safetensors").read_bytes())
    config["quantization_config"]["bits"] = 2
    (bad / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(model_loader, "read_safetensors", lambda folder: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="with 2 bits is not supported"):
        LLMEngine(EngineConfig(model=str(bad), dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=128), bad)


def test_misshaped_quantized_tensor_is_named(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    q_folder, _ = quantized
    tensors = load_file(q_folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.scales"
    tensors[name] = tensors[name][:, :-8].contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((q_folder / "config.json").read_text())
    with pytest.raises(ValueError, match=f"checkpoint tensor '{name}' does not fit the config: expected shape"):
        _logits(bad)


@pytest.mark.gpu
def test_quantized_model_on_gpu_matches_cpu_float32(quantized):
    """bfloat16 with the fused kernels on CUDA against the CPU's float32 logits of the same checkpoint."""
    q_folder, _ = quantized
    cfg = load_model_config(q_folder)
    quant = quantization_config(None, cfg.raw, str(q_folder))
    model = load_model(q_folder, cfg, torch.bfloat16, "cuda", LayerOptions(quant_config=quant))
    ids = torch.arange(3, 40)
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
        gpu = model.compute_logits(model(ids.cuda(), torch.arange(len(ids)).cuda())).cpu()
        one_row = model.compute_logits(model(ids[:1].cuda(), torch.arange(1).cuda())).cpu()  # batch-1 shapes
    ref = _logits(q_folder)
    assert ((gpu - ref).norm() / ref.norm()).item() < 3e-2
    assert ((one_row - ref[:1]).norm() / ref[:1].norm()).item() < 3e-2


@pytest.mark.gpu
def test_quantized_engine_on_gpu_with_cuda_graphs(quantized):
    """The whole engine on CUDA (decode steps replayed from CUDA graphs) gives the greedy tokens of the
    dequantized model's engine there (float32 on both, so no rounding decides a token)."""
    q_folder, deq_folder = quantized
    gpu = dict(dtype="float32", device="cuda", num_kv_blocks=256, max_num_seqs=4)
    tokens = _greedy(q_folder, **gpu)
    assert tokens == _greedy(deq_folder, **gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["awq-g128-tied", "gptq-8bit-g128-v2"])
def test_quantized_engine_compiles_nothing_after_start_up(case, tmp_path):
    """Mixed steps of every row count (prompts of many lengths, one chunked) on 4-bit codes (int4pack's
    tensor-core kernel) and 8-bit ones (quant_linear's): the warm-up compiled every tile variant they need."""
    from qwen_serve.bench.compiles import triton_compiles
    from qwen_serve.engine.llm import LLM

    q_folder, _ = make_quantized_checkpoint(tmp_path, **CASES[case])
    engine = LLMEngine(EngineConfig(model=str(q_folder), dtype="bfloat16", device="cuda", block_size=16,
                                    num_kv_blocks=512, max_model_len=512, max_num_seqs=64,
                                    max_num_batched_tokens=320), q_folder)
    gen = torch.Generator().manual_seed(0)
    lens = [400] + torch.randint(2, 60, (80,), generator=gen).tolist()
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in lens]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + i % 9, ignore_eos=True) for i in range(len(prompts))]
    with triton_compiles() as compiles:
        outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert compiles.available and compiles.as_json()["kernels"] == {}


def test_gptq_shards_with_different_g_idx_are_refused(tmp_path):
    """q, k and v (and gate, up) read one input, so GPTQ gives them one g_idx; a checkpoint whose shards
    disagree cannot be served by one fused matmul and is refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    q_folder, _ = make_quantized_checkpoint(tmp_path, "gptq", bits=4, group_size=32, desc_act=True)
    tensors = load_file(q_folder / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, q_folder / "model.safetensors")
    with pytest.raises(ValueError, match=f"'{name}' does not fit the config: shard 'v_proj' differs from the other shards"):
        _logits(q_folder)
