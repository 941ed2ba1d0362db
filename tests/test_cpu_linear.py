"""bfloat16 linear layers on CPUs without oneDNN bfloat16 packing: float32 copies for many-row calls."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.kernels import cpu_linear
from qwen_serve.layers.linear import RowLinear
from qwen_serve.layers.options import LayerOptions
from qwen_serve.loader.model_loader import load_model, load_model_config

from conftest import make_tiny_checkpoint

LAYERS = 2
PREPARED = 4 * LAYERS + 1  # qkv, o, gate_up, down per layer; lm_head


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory) -> Path:
    """A tiny checkpoint with weights scaled up, so that greedy choices have clear margins."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("cpu_linear") / "m", tied=request.param, layers=LAYERS)
    path = folder / "model.safetensors"
    tensors = {name: t * 8 if t.dim() == 2 else t for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture
def linear_calls(monkeypatch) -> list[torch.dtype]:
    """The input dtype of every F.linear call: float32 ones took the float32 copy."""
    calls: list[torch.dtype] = []
    real = F.linear

    def spy(x, weight, bias=None):
        calls.append(x.dtype)
        return real(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    return calls


def _bf16_model(folder: Path) -> nn.Module:
    return load_model(folder, load_model_config(folder), torch.bfloat16, "cpu")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last token's logits, as a prefill step computes them."""
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids)))[-1:])


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows", [1, 7, 8, 33])
def test_linear_routes_by_rows(rows, linear_calls):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    x = torch.randn(rows, 64, generator=gen).bfloat16()
    plain = F.linear(x, weight, bias)
    linear_calls.clear()
    assert cpu_linear.linear(x, weight, bias).dtype == torch.bfloat16 and linear_calls == [torch.bfloat16]

    layer = RowLinear(64, 96, True, LayerOptions(), "layer", torch.bfloat16)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    assert cpu_linear.add_float32_copies(nn.Sequential(layer)) == 1
    linear_calls.clear()
    out = layer(x)
    float32 = rows >= cpu_linear.FLOAT32_MIN_ROWS
    assert linear_calls == [torch.float32 if float32 else torch.bfloat16] and out.dtype == torch.bfloat16
    if float32:
        assert _relative_error(out, plain) < 1e-2
    else:
        assert torch.equal(out, plain)


@pytest.mark.parametrize("threshold", [1, cpu_linear.FLOAT32_MIN_ROWS, 10**9], ids=["float32", "default", "bfloat16"])
def test_float32_copies_match_bfloat16_model(tiny, threshold, monkeypatch, linear_calls):
    ids = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(0))
    plain = _logits(_bf16_model(tiny), ids)
    model = _bf16_model(tiny)
    assert cpu_linear.add_float32_copies(model) == PREPARED
    monkeypatch.setattr(cpu_linear, "FLOAT32_MIN_ROWS", threshold)
    linear_calls.clear()
    hybrid = _logits(model, ids)
    # 20 rows through the layers, 1 through the lm_head: the default threshold splits them.
    layer_calls, head_call = linear_calls[:-1], linear_calls[-1]
    assert len(layer_calls) == 4 * LAYERS
    assert set(layer_calls) == {torch.bfloat16 if threshold > 20 else torch.float32}
    assert head_call == (torch.float32 if threshold == 1 else torch.bfloat16)
    assert hybrid.dtype == plain.dtype and _relative_error(hybrid, plain) < 1e-2


def test_float32_copies_share_tied_weights_and_keep_names(tiny, caplog):
    model = _bf16_model(tiny)
    names = set(model.state_dict())
    with caplog.at_level(logging.INFO, logger=cpu_linear.__name__):
        assert cpu_linear.add_float32_copies(model) == PREPARED
    assert set(model.state_dict()) == names
    copies = {id(getattr(p, cpu_linear._FLOAT32_COPY)) for p in model.parameters() if p.dim() == 2
              and hasattr(p, cpu_linear._FLOAT32_COPY)}
    assert len(copies) == PREPARED  # the embedding of a tied model is the lm_head's one copy
    assert "GiB extra memory" in caplog.text


def test_float32_copies_skipped_when_memory_is_short(tiny, monkeypatch, caplog):
    model = _bf16_model(tiny)
    linear_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    monkeypatch.setattr(cpu_linear, "physical_memory_bytes", lambda: 3 * linear_bytes)
    with caplog.at_level(logging.INFO, logger=cpu_linear.__name__):
        assert cpu_linear.add_float32_copies(model) == 0
    assert "skipped" in caplog.text
    assert not any(hasattr(p, cpu_linear._FLOAT32_COPY) for p in model.parameters())


def test_pack_linears_keeps_packing_where_it_works(tiny, monkeypatch):
    """Where oneDNN packs bfloat16, the weights are packed as before and get no float32 copies."""
    packed: list[torch.Tensor] = []
    monkeypatch.setattr(cpu_linear, "packing_works", lambda: True)
    monkeypatch.setattr(cpu_linear, "pack_weight", lambda w: packed.append(w) or w.detach().clone())
    model = _bf16_model(tiny)
    tied = model.config.tie_word_embeddings
    assert cpu_linear.pack_linears(model) == PREPARED - tied == len(packed)
    prepared = [m for m in model.modules() if hasattr(m, "quant_method") and not isinstance(m.weight, nn.Parameter)]
    assert len(prepared) == len(packed)  # the packed buffer replaced each parameter
    assert isinstance(model.model.embed_tokens.weight, nn.Parameter)  # looked up: never packed
    assert not any(hasattr(p, cpu_linear._FLOAT32_COPY) for p in model.parameters())


def test_pack_linears_gives_float32_copies_where_packing_fails(tiny, monkeypatch):
    monkeypatch.setattr(cpu_linear, "packing_works", lambda: False)
    model = _bf16_model(tiny)
    assert cpu_linear.pack_linears(model) == PREPARED
    assert hasattr(model.lm_head.weight, cpu_linear._FLOAT32_COPY)
    float32_model = load_model(tiny, load_model_config(tiny), torch.float32, "cpu")
    assert cpu_linear.pack_linears(float32_model) == 0


@pytest.mark.parametrize("packing", [False, True], ids=["no-packing", "packing"])
def test_engine_greedy_output_unchanged(tiny, packing, monkeypatch, linear_calls):
    """Forcing every route of the float32 copies gives the bfloat16 engine's greedy tokens; where
    packing works (stubbed as an unpacked weight here), no matmul runs in float32."""
    monkeypatch.setattr(cpu_linear, "packing_works", lambda: packing)
    if packing:
        monkeypatch.setattr(cpu_linear, "pack_weight", lambda w: w.detach().clone())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 9, 17, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model=str(tiny), dtype="bfloat16", device="cpu", block_size=4,
                                    num_kv_blocks=64, max_model_len=64, enable_prefix_caching=False), tiny)
    results = {}
    for threshold in (10**9, cpu_linear.FLOAT32_MIN_ROWS, 1):
        monkeypatch.setattr(cpu_linear, "FLOAT32_MIN_ROWS", threshold)
        linear_calls.clear()
        for i, p in enumerate(prompts):
            engine.add_request(f"{threshold}-{i}", p, params)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        results[threshold] = [outputs[f"{threshold}-{i}"] for i in range(len(prompts))]
        assert (torch.float32 in linear_calls) == (threshold < 10**9 and not packing)
    assert results[cpu_linear.FLOAT32_MIN_ROWS] == results[1] == results[10**9]
