"""Tensor parallelism on several GPUs (NCCL, CUDA graphs capturing the all-reduce): marked, and skipped
on a machine with fewer GPUs than a case needs. The same cases run on the CPU over gloo in
tests/test_tensor_parallel.py; here the kernels, the graphs and NCCL are what is new."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_checkpoint
from qwen_serve.config import EngineConfig
from qwen_serve.engine.executor import ExecutorDeadError
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
VOCAB = 320


def _needs(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, this machine has {torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny random checkpoint (head_dim 64 for the kernels) with weights scaled up for clear greedy margins."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tp_gpu") / "m", heads=4, kv_heads=2, hidden=256,
                                  vocab=VOCAB, max_pos=512)
    path = folder / "model.safetensors"
    save_file({name: t * 4 if t.dim() == 2 else t for name, t in load_file(path).items()}, path,
              metadata={"format": "pt"})
    return folder


def _generate(folder: Path, n: int, **overrides) -> list[list[int]]:
    cfg = dict(model=str(folder), dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=256,
               max_model_len=256, tensor_parallel_size=n)
    engine = LLMEngine(EngineConfig(**{**cfg, **overrides}), folder)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in (1, 5, 9, 30, 7, 17)]
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True))
        out = {}
        while engine.has_unfinished_requests():
            out.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    finally:
        engine.close()
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_greedy_equals_one_gpu_with_graphs_and_eager(tiny, n):
    _needs(n)
    one = _generate(tiny, 1, dtype="float32", enforce_eager=True)
    # float32 so that only the order of the all-reduce's sums differs from one GPU.
    assert _generate(tiny, n, dtype="float32", enforce_eager=True) == one
    assert _generate(tiny, n, dtype="float32") == one  # decode graphs capture NCCL's all-reduce


def test_killed_rank_fails_fast_and_leaves_no_process(tiny):
    _needs(2)
    engine = LLMEngine(EngineConfig(model=str(tiny), device="cuda", num_kv_blocks=64, max_model_len=256,
                                    tensor_parallel_size=2), tiny)
    procs = list(engine.executor.procs)
    try:
        os.kill(procs[1].pid, signal.SIGKILL)
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=8))
        start = time.monotonic()
        with pytest.raises(ExecutorDeadError):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 30
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)
