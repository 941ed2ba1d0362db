"""Decode CUDA graphs in the engine: greedy output with graphs equals the eager runner's on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm import LLM
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.worker.cuda_graphs import DecodeGraphs, batch_buckets

from conftest import make_tiny_checkpoint

pytestmark = pytest.mark.gpu
VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny random checkpoint with weights scaled up, so greedy choices have clear margins."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("graphs") / "m", vocab=VOCAB, max_pos=512)
    path = folder / "model.safetensors"
    tensors = {name: t * 8 if t.dim() == 2 else t for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def _generate(folder: Path, **overrides) -> tuple[LLMEngine, list[list[int]]]:
    cfg = dict(model=str(folder), dtype="float32", device="cuda", block_size=4, num_kv_blocks=256, max_model_len=128)
    engine = LLMEngine(EngineConfig(**{**cfg, **overrides}), Path(folder))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 5, 9, 13, 3, 30, 7, 2, 17, 11, 4)]
    # Different lengths: sequences finish one after another, so decode batches take many sizes.
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    return engine, [o.outputs[0].token_ids for o in outs]


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("max_num_seqs", [16, 6])
def test_graphs_match_eager(tiny, monkeypatch, max_num_seqs):
    eager_engine, eager = _generate(tiny, max_num_seqs=max_num_seqs, enforce_eager=True)
    assert eager_engine.executor.runner.graphs is None

    sizes: list[int] = []
    run = DecodeGraphs.run

    def counting_run(self, ids, *args):
        sizes.append(len(ids))
        return run(self, ids, *args)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    engine, graphed = _generate(tiny, max_num_seqs=max_num_seqs)
    assert sorted(engine.executor.runner.graphs.graphs) == batch_buckets(max_num_seqs)
    assert graphed == eager
    # Replays covered several batch sizes, some of them padded up to a larger bucket.
    assert len(set(sizes)) >= 3 and set(sizes) - set(batch_buckets(max_num_seqs))
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_overlapped_steps_match_and_launch_without_a_sync(tiny, monkeypatch):
    """Overlapped steps on CUDA (the default there) give the output of collected-at-once steps, and
    launching a step never waits for the GPU (torch's sync debug mode raises on any wait)."""
    from qwen_serve.worker.model_runner import ModelRunner

    _, plain = _generate(tiny, overlap_steps="off")
    launch = ModelRunner.launch

    def strict_launch(self, sched):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(self, sched)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(ModelRunner, "launch", strict_launch)
    engine, overlapped = _generate(tiny)
    assert engine.overlap and overlapped == plain
    sampled = SamplingParams(temperature=0.9, top_p=0.9, top_k=30, seed=5, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = LLM.from_engine(engine).generate([[1, 2, 3], [4, 5]], sampled, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    # Prompt logprobs are copied to the host at collect, not in launch; the same values as collected at once.
    scored = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2)
    prompt = list(range(10, 40))
    overlapped_lp = LLM.from_engine(engine).generate([prompt], scored, use_tqdm=False)[0].prompt_logprobs
    monkeypatch.setattr(ModelRunner, "launch", launch)
    plain_engine, _ = _generate(tiny, overlap_steps="off")
    plain_lp = LLM.from_engine(plain_engine).generate([prompt], scored, use_tqdm=False)[0].prompt_logprobs
    assert overlapped_lp[0] is None and len(overlapped_lp) == len(prompt)
    assert [sorted(e) for e in overlapped_lp[1:]] == [sorted(e) for e in plain_lp[1:]]
    for got, want in zip(overlapped_lp[1:], plain_lp[1:]):
        assert all(abs(got[t].logprob - want[t].logprob) < 1e-5 for t in want)
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_no_triton_compile_after_start_up(tmp_path, monkeypatch):
    """Every kernel variant that a mix of served steps needs compiles while the engine starts: a long
    prompt in two dense chunks (the second after a cached prefix), and mixed steps whose sampling rows
    reach past the point where the decode-shaped attention widens its tiles (rows x KV heads >= SMs)."""
    from qwen_serve.bench.compiles import triton_compiles
    from qwen_serve.layers.attention import OutputRows

    folder = make_tiny_checkpoint(tmp_path / "m", vocab=VOCAB, max_pos=4096)
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="bfloat16", device="cuda", block_size=16,
                                    num_kv_blocks=1024, max_model_len=3072, max_num_seqs=96,
                                    max_num_batched_tokens=1536), folder)
    rows_seen: list[int] = []
    last_rows = OutputRows.last_rows.__func__

    def counting(cls, meta, seqs, to_device):
        rows_seen.append(len(seqs))
        return last_rows(cls, meta, seqs, to_device)

    monkeypatch.setattr(OutputRows, "last_rows", classmethod(counting))
    gen = torch.Generator().manual_seed(1)
    lens = [2600] + torch.randint(3, 40, (90,), generator=gen).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lens]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=0.9, seed=i, max_tokens=2 + i % 7,
                             ignore_eos=True) for i in range(len(prompts))]
    with triton_compiles() as compiles:
        outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert max(rows_seen) * 2 >= sms  # the tiny model has 2 KV heads
    assert compiles.available and compiles.as_json()["kernels"] == {}
