"""FP8 W8A8 (layers/quantization/fp8.py, kernels/fp8.py): quantized at load and from FP8 checkpoints in the
published layouts (AutoFP8's "fp8" and compressed-tensors), refused off Hopper and for schemes it does not
serve. The CPU runs the method's float32 reference (the same quantized values, dequantized); the marked
GPU tests hold the FP8 matmul to it.

Tolerances. float8_e4m3 keeps 3 mantissa bits: rounding to nearest moves a value by at most 2^-4 of it
(6.25%), and by 2^-4 / sqrt(3) = 3.6% rms for values spread across a binade. A matmul rounds both operands,
but a sum of K terms averages their independent errors, so its output is off by a few % of its rms; the
tiny model's logits measured 3.2% off in relative norm (quantized at load), 2.4-2.6% against transformers
on a checkpoint's dequantized weights (only the activations' rounding remains there). Bounds: 8% and 6%.
The random model's top two logits are often within 1% of each other, so greedy agreement is only held to
75% of positions (measured 89%).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.kernels import fp8
from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.quantization import quantization_config
from qwen_serve.layers.quantization.fp8 import Fp8Config
from qwen_serve.loader.model_loader import load_model, load_model_config

from conftest import make_tiny_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATIC_INPUT_SCALE = 8.0 / fp8.FP8_MAX  # activations up to 8 in magnitude (the tiny model's are below 5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp8_tiny"))


def _logits(folder: Path, quant=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    cfg = load_model_config(folder)
    quant = quant or quantization_config(None, cfg.raw, str(folder))
    model = load_model(folder, cfg, dtype, device, LayerOptions(quant_config=quant))
    ids = torch.arange(3, 40, device=device)
    with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
        return model.compute_logits(model(ids, torch.arange(len(ids), device=device))).float().cpu()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_weight_quantization_rounds_each_row_to_nearest_e4m3():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0  # a row of zeros stays zero
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = q.float() * scale[:, None]
    assert torch.equal(back[5], torch.zeros(256))
    rows = [i for i in range(64) if i != 5]
    assert torch.allclose(q.float().abs().amax(dim=1)[rows], torch.full((63,), fp8.FP8_MAX))
    # Half an ulp: 2^-4 of the value for normal numbers, 2^-10 of the scale below e4m3's smallest normal 2^-6.
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()


def test_quantized_at_load_stays_close_to_the_unquantized_model(tiny):
    ref = _logits(tiny)
    ours = _logits(tiny, Fp8Config(serialized=False))
    assert _rel(ours, ref) < 0.08
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def _write_fp8_checkpoint(src: Path, dst: Path, layout: str,
                          scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    """An FP8 checkpoint of `src` in a published layout, and a float32 folder with its dequantized weights.
    layouts: "fp8-static" (AutoFP8: per-tensor weight_scale, input_scale), "ct-channel" (compressed-
    tensors: weight_scale [N, 1] bf16, dynamic per-token activations), "ct-tensor-static"."""
    deq = dst.parent / f"{dst.name}-dequantized"
    for folder in (dst, deq):
        shutil.copytree(src, folder)
    tensors = load_file(src / "model.safetensors")
    quant, dequant = {}, {}
    for name, t in tensors.items():
        if not name.endswith(tuple(f"{m}.weight" for m in LINEARS)):
            quant[name] = dequant[name] = t
            continue
        base = name.removesuffix(".weight")
        if layout == "ct-channel":
            q, scale = fp8.quantize_weight(t)
            quant[f"{base}.weight_scale"] = scale.to(scale_dtype)[:, None]
            scale = quant[f"{base}.weight_scale"].float()[:, 0]
        else:
            scale = (t.abs().amax() / fp8.FP8_MAX).reshape(())
            q = (t / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
            quant[f"{base}.weight_scale"] = scale.reshape(1) if layout == "ct-tensor-static" else scale
            quant[f"{base}.input_scale"] = torch.tensor([STATIC_INPUT_SCALE] if layout == "ct-tensor-static"
                                                        else STATIC_INPUT_SCALE)
            scale = scale.expand(t.shape[0])
        quant[name] = q
        dequant[name] = q.float() * scale[:, None]
    save_file(quant, dst / "model.safetensors")
    save_file(dequant, deq / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if layout == "fp8-static":
        qc = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    else:
        static = layout == "ct-tensor-static"
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"type": "float", "num_bits": 8, "strategy": "tensor" if static else "channel",
                              "dynamic": False, "symmetric": True},
                  "input_activations": {"type": "float", "num_bits": 8, "strategy": "tensor" if static else "token",
                                        "dynamic": not static, "symmetric": True}}},
              "kv_cache_scheme": None}
    (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    return dst, deq


@pytest.mark.parametrize("layout", ["fp8-static", "ct-channel", "ct-tensor-static"])
def test_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(tiny, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    q_folder, deq_folder = _write_fp8_checkpoint(tiny, tmp_path / layout, layout)
    ours = _logits(q_folder)
    model = AutoModelForCausalLM.from_pretrained(deq_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.arange(3, 40)[None]).logits[0]
    assert _rel(ours, ref) < 0.06


def test_per_channel_checkpoint_equals_quantizing_at_load(tiny, tmp_path):
    """A compressed-tensors checkpoint with float32 scales, quantized by the rule --quantization fp8 applies
    at load, gives the same logits bit for bit: every tensor of the layout lands where it belongs."""
    q_folder, _ = _write_fp8_checkpoint(tiny, tmp_path / "ct", "ct-channel", scale_dtype=torch.float32)
    assert torch.equal(_logits(q_folder), _logits(tiny, Fp8Config(serialized=False)))


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise FP8"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "format 'e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["model.layers.0.mlp.down_proj"]},
     "leaving layers unquantized"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "strategy": "group"}}}}, "format 'pack-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
        "input_activations": None}}}, "activations none"),
])
def test_unsupported_fp8_schemes_are_refused(qc, match):
    with pytest.raises(ValueError, match=match):
        quantization_config(None, {"quantization_config": qc})


def test_fp8_is_refused_on_the_cpu_before_loading(tiny):
    with pytest.raises(ValueError, match=r"compute capability 9.0 or later .* this is the CPU"):
        LLMEngine(EngineConfig(model=str(tiny), device="cpu", quantization="fp8", num_kv_blocks=16), tiny)


def test_misshaped_weight_scale_is_named(tiny, tmp_path):
    q_folder, _ = _write_fp8_checkpoint(tiny, tmp_path / "ct", "ct-channel")
    tensors = load_file(q_folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[name] = tensors[name][:-3]
    save_file(tensors, q_folder / "model.safetensors")
    with pytest.raises(ValueError, match=f"checkpoint tensor '{name}' does not fit the config"):
        _logits(q_folder)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_fp8_matmul_matches_the_reference(rows):
    """torch's scaled matmul against the float32 reference on the same quantized values: only the order of
    the sums and the bfloat16 output rounding (2^-9 relative) differ."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 1024, device="cuda", generator=gen).bfloat16()
    w, scale = fp8.quantize_weight(torch.randn(768, 1024, device="cuda", generator=gen) * 0.02)
    bias = torch.randn(768, device="cuda", generator=gen).bfloat16()
    for input_scale in (None, torch.tensor(4.0 / fp8.FP8_MAX, device="cuda")):
        for fused in (True, False):
            out = fp8.linear(x, w, scale, bias, input_scale, fused=fused)
            ref = fp8.linear_reference(x.float(), w, scale, bias, input_scale)
            assert out.dtype == torch.bfloat16 and _rel(out.float(), ref) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [64, 3584, 18944])
def test_fused_activation_quantization_equals_the_reference(cols):
    gen = torch.Generator(device="cuda").manual_seed(cols)
    x = (torch.randn(37, cols, device="cuda", generator=gen) * torch.logspace(-4, 2, 37, device="cuda")[:, None]).bfloat16()
    x[3] = 0.0
    from qwen_serve.kernels.fused import fp8_quantize_rows

    for static in (None, torch.tensor(0.01, device="cuda")):
        q, s = fp8_quantize_rows(x, static)
        q_ref, s_ref = fp8.quantize_rows(x, static)
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
def test_fp8_engine_on_gpu_with_cuda_graphs_matches_the_reference(tiny):
    """The tiny model's logits on the H100/H200 (bfloat16 activations, FP8 matmuls) against the CPU
    float32 reference; the engine (CUDA graphs for decode) runs and stops."""
    ref = _logits(tiny, Fp8Config(serialized=False))
    gpu = _logits(tiny, Fp8Config(serialized=False), torch.bfloat16, "cuda")
    assert _rel(gpu, ref) < 3e-2
    engine = LLMEngine(EngineConfig(model=str(tiny), device="cuda", dtype="bfloat16", quantization="fp8",
                                    num_kv_blocks=64, max_model_len=128, max_num_seqs=4), tiny)
    from qwen_serve.engine.sampling_params import SamplingParams

    engine.add_request("a", list(range(5, 30)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        out = engine.step()
    assert len(out[0].outputs[0].token_ids) == 8
    engine.close()
