"""--kv-cache-dtype fp8 / fp8_e5m2: the KV cache held in float8 (half a bfloat16 cache's bytes), written with
torch's saturating cast and read back in the model's dtype. The CPU runs the torch reference path; the marked
GPU tests (here and in tests/gpu/test_kernels.py) hold the Triton write and attention kernels to it.

Tolerance. e4m3 rounds each key and value by at most 2^-4 of it (3.6% rms), e5m2 by 2^-3 (7.2% rms). A score
q.k sums head_dim such errors, which mostly cancel, and the attention output is a softmax-weighted mean of
rounded values, so the logits move by a few % of the rounding; measured on the tiny model below in float32
(prompt logprobs over 60 positions, chunked so that later chunks read earlier ones from the cache): max
|difference| 0.0045 nats for e4m3, 0.0082 for e5m2 (the logprobs themselves are ~ -5.8). Bounds 0.02 and 0.04.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm import LLM
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.layers.attention import write_kv_cache
from qwen_serve.layers.options import LayerOptions
from qwen_serve.worker.model_runner import check_kernel_dtype

from conftest import make_tiny_checkpoint

BOUND = {"fp8": 0.02, "fp8_e5m2": 0.04}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv_fp8"), layers=3)


def _engine(folder: Path, kv_cache_dtype: str, **overrides) -> LLMEngine:
    cfg = dict(model=str(folder), dtype="float32", device="cpu", block_size=4, max_model_len=256,
               max_num_batched_tokens=24, kv_cache_dtype=kv_cache_dtype, kv_cache_gb=0.001)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), folder)


def _prompt() -> list[int]:
    return torch.randint(0, 318, (60,), generator=torch.Generator().manual_seed(1)).tolist()


def _prompt_logprobs(engine: LLMEngine) -> torch.Tensor:
    out = LLM.from_engine(engine).generate([_prompt()], SamplingParams(max_tokens=0, prompt_logprobs=0),
                                           use_tqdm=False)[0]
    tokens = _prompt()
    return torch.tensor([pos[tokens[i]].logprob for i, pos in enumerate(out.prompt_logprobs) if pos is not None])


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_a_float8_cache_holds_more_tokens_and_keeps_the_logits(tiny, kv_cache_dtype):
    plain, quant = _engine(tiny, "auto"), _engine(tiny, kv_cache_dtype)
    try:
        cache = quant.executor.runner.kv_cache
        assert cache.dtype == (torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.float8_e5m2)
        # The same bytes hold 4x the tokens of a float32 cache (each count rounded down to whole blocks).
        blocks = plain.stats().num_kv_blocks_total
        assert 4 * blocks <= quant.stats().num_kv_blocks_total < 4 * (blocks + 1)
        ref, ours = _prompt_logprobs(plain), _prompt_logprobs(quant)
        assert len(ref) == 59 and (ours - ref).abs().max() < BOUND[kv_cache_dtype]
        assert not torch.equal(ours, ref)  # the cache really is rounded
    finally:
        plain.close()
        quant.close()


def test_float8_cache_with_prefix_caching_and_preemption_gives_the_same_tokens(tiny):
    """Copy-on-write of forked blocks and prefix hits go through the float8 cache's bytes: greedy
    continuations of a shared prompt (n = 2 forks it) match a run of each prompt alone."""
    prompt = _prompt()[:30]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)
    engine = _engine(tiny, "fp8", kv_cache_gb=0.01)
    try:
        llm = LLM.from_engine(engine)
        first = llm.generate([prompt], params, use_tqdm=False)[0]
        again = llm.generate([prompt, prompt], params, use_tqdm=False)  # prefix-cache hits
        tokens = [o.token_ids for o in first.outputs]
        assert tokens[0] == tokens[1]
        assert all([o.token_ids for o in r.outputs] == tokens for r in again)
    finally:
        engine.close()


@pytest.mark.parametrize("dtype,top", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)])
def test_the_write_saturates_at_the_formats_range(dtype, top):
    """As the Triton write kernel does (kernels/kv_store.py), whatever torch's own cast does past the range."""
    k = torch.tensor([[[1e6, -1e6, 300.0, 0.01]]])
    k_cache = torch.zeros(2, 2, 1, 4, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    write_kv_cache(k, k, k_cache, v_cache, torch.tensor([3]))
    assert k_cache[1, 1, 0].float().tolist() == [top, -top, torch.tensor(300.0).to(dtype).item(),
                                                 torch.tensor(0.01).to(dtype).item()]


def test_unknown_kv_cache_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"--kv-cache-dtype 'int8' is not supported; choose auto, fp8, fp8_e4m3, fp8_e5m2"):
        EngineConfig(kv_cache_dtype="int8")


def test_float8_cache_is_refused_on_a_gpu_before_ada(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or newer.*8\.0"):
        check_kernel_dtype(torch.device("cuda"), torch.bfloat16, 128, LayerOptions(), "fp8")
    check_kernel_dtype(torch.device("cuda"), torch.bfloat16, 128, LayerOptions(), "auto")


@pytest.mark.gpu
def test_on_cuda_the_kernels_read_the_float8_cache_as_the_reference_does(tiny):
    """The engine on CUDA (Triton write and attention kernels, decode CUDA graphs) against the torch path
    on the same device with the same float8 cache: prompt logprobs and greedy tokens."""
    cuda = dict(device="cuda", dtype="bfloat16", num_kv_blocks=512)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = []
    for fused in (True, False):
        engine = _engine(tiny, "fp8", fused_kernels=fused, **cuda)
        try:
            tokens = LLM.from_engine(engine).generate([_prompt()], params, use_tqdm=False)[0].outputs[0].token_ids
            results.append((_prompt_logprobs(engine), tokens))
        finally:
            engine.close()
    (kernel_lp, kernel_tokens), (torch_lp, torch_tokens) = results
    assert (kernel_lp - torch_lp).abs().max() < 0.05  # bfloat16 activations on both sides
    assert kernel_tokens == torch_tokens
