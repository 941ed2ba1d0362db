"""The runner's start-up steps and the benchmark's Triton compile log (no GPU needed)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from qwen_serve.bench.compiles import triton_compiles
from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm import LLM
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.layers import options
from qwen_serve.layers.options import LayerOptions
from qwen_serve.worker.model_runner import check_kernel_dtype
from qwen_serve.worker.warm_up import WarmUpStep, eager_warm_up_steps

from conftest import make_tiny_checkpoint


def test_warm_up_steps_cover_each_kind_within_the_limits():
    steps = eager_warm_up_steps(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=32768, block_size=16,
                                dense_min_len=1024)
    assert steps == [WarmUpStep((1024,), (16,)), WarmUpStep((2,) + (1,) * 255, (16,) * 256), WarmUpStep((2,), (16,))]
    # The quantized linears' row buckets: a chunk of each power of two tokens up to their bound.
    steps = eager_warm_up_steps(256, 8192, 32768, 16, 1024, linear_rows_max=256)
    assert [s.query_lens for s in steps[3:]] == [(4,), (8,), (16,), (32,), (64,), (128,), (256,)]
    # ... and one chunk past the bound (the dequantize path) where the dense chunk is not one.
    steps = eager_warm_up_steps(64, 320, 512, 16, 1024, linear_rows_max=256)
    assert [s.query_lens for s in steps[2:]] == [(4,), (8,), (16,), (32,), (64,), (128,), (256,), (257,)]
    assert max(eager_warm_up_steps(64, 256, 512, 16, 1024, linear_rows_max=256)[-1].query_lens) == 256
    for max_num_seqs, budget, max_len in [(256, 300, 32768), (4, 8192, 1000), (1, 16384, 131072), (8, 2, 64),
                                          (4, 100, 80)]:
        steps = eager_warm_up_steps(max_num_seqs, budget, max_len, 16, 1024, linear_rows_max=256)
        assert steps, (max_num_seqs, budget, max_len)
        for step in steps:
            assert step.num_tokens <= budget and len(step.query_lens) <= max_num_seqs
            assert max(q + c for q, c in zip(step.query_lens, step.context_lens)) <= max_len
            # Never decode-only (graphs serve those), and every chunk follows a cached prefix.
            assert max(step.query_lens) > 1 and min(step.context_lens) > 0
        # The dense path only where a chunk that long can be scheduled.
        assert any(max(s.query_lens) >= 1024 for s in steps) == (budget >= 1024 and max_len >= 1040)
    assert eager_warm_up_steps(8, 8192, 4096, 16, None)[0] == WarmUpStep((2,) + (1,) * 7, (16,) * 8)


class _FakeRuntime:
    jit_cache_hook = None
    jit_post_compile_hook = None


@pytest.fixture
def fake_triton(monkeypatch):
    """A `triton` package whose knobs.runtime has the two JIT hooks, as Triton 3.6's does."""
    runtime = _FakeRuntime()
    triton = types.ModuleType("triton")
    triton.knobs = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "triton", triton)
    return runtime


def _compile(runtime, name: str, key: str):
    """What Triton's JIT does for a kernel variant missing from its in-memory cache."""
    fn = types.SimpleNamespace(name=name)
    if runtime.jit_cache_hook is not None and runtime.jit_cache_hook(key=key, fn=fn, repr="", compile={},
                                                                     is_manual_warmup=False, already_compiled=False):
        return "skipped"
    if runtime.jit_post_compile_hook is not None:
        runtime.jit_post_compile_hook(key=key, fn=fn, repr="", compile={}, is_manual_warmup=False,
                                      already_compiled=False)
    return "compiled"


def test_compile_log_counts_each_kernel_and_restores_the_hooks(fake_triton):
    seen = []

    def previous(**kwargs):
        seen.append(kwargs["fn"].name)
        return kwargs["fn"].name == "skip_me"

    fake_triton.jit_cache_hook = previous
    _compile(fake_triton, "before", "k0")
    with triton_compiles() as log:
        assert _compile(fake_triton, "_paged_attention_kernel", "k1") == "compiled"
        assert _compile(fake_triton, "_paged_attention_kernel", "k2") == "compiled"
        assert _compile(fake_triton, "_merge_two_kernel", "k1") == "compiled"
        assert _compile(fake_triton, "skip_me", "k3") == "skipped"  # the earlier hook's answer stands
    _compile(fake_triton, "after", "k4")
    assert log.as_json()["count"] == 3
    assert log.as_json()["kernels"] == {"_paged_attention_kernel": 2, "_merge_two_kernel": 1}
    assert all(r.seconds >= 0 for r in log.records)
    assert seen == ["before", "_paged_attention_kernel", "_paged_attention_kernel", "_merge_two_kernel", "skip_me",
                    "after"]
    assert fake_triton.jit_cache_hook is previous and fake_triton.jit_post_compile_hook is None


def test_compile_log_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    with triton_compiles() as log:
        pass
    assert not log.available and log.as_json() is None


def test_runner_warm_up_writes_nothing_and_changes_no_output(tmp_path):
    """The warm-up steps run through the eager forward (here on the CPU's torch path, as the GPU runs them
    through its kernels): the KV cache stays as it was and a greedy generation is unchanged."""
    folder = make_tiny_checkpoint(tmp_path / "m", max_pos=512)
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
                                    max_model_len=256, max_num_seqs=8, max_num_batched_tokens=96), folder)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    before = [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)]
    cache = engine.executor.runner.kv_cache.clone()
    engine.executor.runner._warm_up_eager(dense_min_len=64)
    assert torch.equal(engine.executor.runner.kv_cache, cache)
    after = [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)]
    assert after == before


def test_float32_on_gpu_is_refused_where_the_kernel_tiles_do_not_fit(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(options, "triton_available", lambda: True)
    fused = LayerOptions()
    with pytest.raises(ValueError, match="head_dim <= 64 .* has 128.*bfloat16"):
        check_kernel_dtype(cuda, torch.float32, 128, fused)
    for device, dtype, head_dim in [(cuda, torch.bfloat16, 128), (cuda, torch.float16, 128), (cuda, torch.float32, 64),
                                    (cpu, torch.float32, 128)]:
        check_kernel_dtype(device, dtype, head_dim, fused)
    check_kernel_dtype(cuda, torch.float32, 128, LayerOptions(fused_kernels=False))  # --no-fused-kernels: torch's path
    monkeypatch.setattr(options, "triton_available", lambda: False)
    check_kernel_dtype(cuda, torch.float32, 128, fused)
