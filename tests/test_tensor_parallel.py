"""Tensor parallelism on the CPU: N worker processes over gloo against one process and transformers.

The tiny models are float32, so a sharded model differs from the whole one only by the order of
float32 sums (the all-reduce adds partial products): 1e-4 on logprobs of about -5 is far above that
noise (~1e-6 seen) and far below any wrong slice, which moves them by whole units.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_checkpoint
from quant_checkpoints import make_quantized_checkpoint
from qwen_serve.config import EngineConfig
from qwen_serve.engine.executor import ExecutorDeadError
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams

PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 117))]
TOL = 1e-4


def _engine(folder: Path, n: int, **extra) -> LLMEngine:
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu", num_kv_blocks=64, block_size=4,
                          max_model_len=128, tensor_parallel_size=n, **extra)
    return LLMEngine(config, folder)


def _run(engine: LLMEngine, params: SamplingParams) -> dict[str, object]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    out = {}
    while engine.has_unfinished_requests():
        out.update({o.request_id: o for o in engine.step() if o.finished})
    return out


def _run_one(engine: LLMEngine) -> str:
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                return o.outputs[0].text
    raise AssertionError("nothing finished")


def _transformers_logprobs(folder: Path, prompt: list[int]) -> torch.Tensor:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _worker_pids(parent: int) -> list[int]:
    """Live processes `parent` spawned through multiprocessing (its tensor-parallel ranks; not the
    resource tracker multiprocessing also starts), read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z" and b"spawn_main" in cmdline:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """N = 2: untied, vocabulary 320; N = 4: tied, vocabulary 322 (the last rank's rows padded), and more
    ranks than the 2 key/value heads (each replicated on two ranks)."""
    root = tmp_path_factory.mktemp("tp")
    return {2: make_tiny_checkpoint(root / "untied"), 4: make_tiny_checkpoint(root / "tied", tied=True, vocab=322)}


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_model_matches_one_process_and_transformers(checkpoints, n):
    folder = checkpoints[n]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    whole = _run(_engine(folder, 1), params)
    # N = 4 also overlaps steps: each rank reads the token it sampled last step from its own memory.
    sharded_engine = _engine(folder, n, overlap_steps="on" if n == 4 else "off")
    try:
        sharded = _run(sharded_engine, params)
        # Seeded sampling draws the same noise on every rank: the same tokens as one process.
        seeded = _run(sharded_engine, SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True))
    finally:
        sharded_engine.close()
    single_seeded = _run(_engine(folder, 1), SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True))
    for i, prompt in enumerate(PROMPTS):
        ours, one = sharded[str(i)], whole[str(i)]
        assert ours.outputs[0].token_ids == one.outputs[0].token_ids
        assert seeded[str(i)].outputs[0].token_ids == single_seeded[str(i)].outputs[0].token_ids
        ref = _transformers_logprobs(folder, prompt)  # [len, vocab]: row j predicts token j + 1
        for pos in range(1, len(prompt)):
            entry = ours.prompt_logprobs[pos]
            assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < TOL
            top = ref[pos - 1].topk(3)
            for token, value in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(entry[token].logprob - value) < TOL
        first = ours.outputs[0].logprobs[0]  # the first generated token, from the prompt's last row
        assert max(first, key=lambda t: first[t].logprob) == ref[-1].argmax().item()
        for token, lp in first.items():
            assert abs(lp.logprob - ref[-1, token].item()) < TOL


def test_speculative_steps_run_on_every_rank(checkpoints):
    """Drafted steps (several sampled rows a sequence) cross the executor like any other: N = 2 with
    prompt-lookup speculation gives N = 1's greedy tokens without it."""
    folder = checkpoints[2]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    whole = _run(_engine(folder, 1), params)
    engine = _engine(folder, 2, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    try:
        drafted = _run(engine, params)
        assert engine.stats().spec_num_draft_tokens > 0
    finally:
        engine.close()
    assert all(drafted[k].outputs[0].token_ids == whole[k].outputs[0].token_ids for k in whole)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_quantized_checkpoints_shard_along_their_groups(tmp_path, method):
    q_folder, _ = make_quantized_checkpoint(tmp_path, method, group_size=32)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    whole = _run(_engine(q_folder, 1), params)
    engine = _engine(q_folder, 2)
    try:
        sharded = _run(engine, params)
    finally:
        engine.close()
    for key, one in whole.items():
        assert sharded[key].outputs[0].token_ids == one.outputs[0].token_ids
        for ours, ref in zip(sharded[key].outputs[0].logprobs, one.outputs[0].logprobs):
            for token, lp in ref.items():
                assert abs(ours[token].logprob - lp.logprob) < 1e-3  # float16 scales, dequantized per rank


def test_act_order_gptq_split_by_rows_is_refused_by_name(tmp_path):
    q_folder, _ = make_quantized_checkpoint(tmp_path, "gptq", group_size=32, desc_act=True)
    with pytest.raises(ValueError, match="act-order"):
        _engine(q_folder, 2)


@pytest.mark.parametrize("heads, kv_heads, n, match", [
    (4, 2, 3, "does not divide the attention heads"),
    (6, 3, 2, "does not divide the key/value heads"),
    (12, 4, 6, "larger than the 4 key/value heads and not a multiple"),
])
def test_sizes_the_model_cannot_split_are_refused_before_loading(tmp_path, monkeypatch, heads, kv_heads, n, match):
    import qwen_serve.engine.executor as executor

    folder = make_tiny_checkpoint(tmp_path / "m", heads=heads, kv_heads=kv_heads, hidden=16 * heads)
    monkeypatch.setattr(executor, "_start_ranks", lambda *a: pytest.fail("no rank may start"))
    with pytest.raises(ValueError, match=match):
        _engine(folder, n)
    with pytest.raises(ValueError, match="at least 1"):
        EngineConfig(tensor_parallel_size=0)


def test_gguf_and_missing_gpus_are_refused_before_loading(checkpoints, monkeypatch):
    import qwen_serve.engine.executor as executor
    from qwen_serve.models.config import ModelConfig

    cfg = ModelConfig.from_file(checkpoints[2] / "config.json")
    gguf = ModelConfig.from_dict({**cfg.raw, "quantization_config": {"quant_method": "gguf"}}, source="test")
    with pytest.raises(ValueError, match="GGUF"):
        executor.check_parallel_config(EngineConfig(tensor_parallel_size=2), gguf, "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs here; this host has 1"):
        executor.check_parallel_config(EngineConfig(tensor_parallel_size=2), cfg, "cuda")


@pytest.mark.parametrize("flags, match", [
    (dict(tensor_parallel_size=4, nnodes=3), "divide"),
    (dict(tensor_parallel_size=4, nnodes=2, node_rank=2), "node-rank"),
    (dict(tensor_parallel_size=4, nnodes=2, master_port=29500), "master-addr"),
    (dict(tensor_parallel_size=4, nnodes=2, master_addr="10.0.0.1"), "master-port"),
])
def test_multi_host_flags_are_checked(monkeypatch, flags, match):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match=match):
        EngineConfig(**flags)


def test_a_killed_rank_fails_the_next_step_and_no_process_is_left(checkpoints):
    engine = _engine(checkpoints[2], 2)
    procs = list(engine.executor.procs)
    try:
        os.kill(procs[1].pid, signal.SIGKILL)
        engine.add_request("r", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4))
        start = time.monotonic()
        with pytest.raises(ExecutorDeadError, match="exited"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 20
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)


def test_close_leaves_no_process(checkpoints):
    engine = _engine(checkpoints[2], 2)
    try:
        pids = _worker_pids(os.getpid())
        assert sorted(pids) == sorted(p.pid for p in engine.executor.procs)
    finally:
        engine.close()
    assert not any(_alive(pid) for pid in pids)


def test_server_with_two_ranks_answers_then_stops_cleanly(tiny_chat_checkpoint, tmp_path):
    from openai import OpenAI

    from server_process import ServerProcess

    prompt = list(range(1000, 1012))
    one = _engine(tiny_chat_checkpoint, 1)
    one.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    expected = _run_one(one)

    server = ServerProcess(tiny_chat_checkpoint, tmp_path / "log", "--tensor-parallel-size", "2",
                           "--num-kv-blocks", "64", "--max-model-len", "512")
    try:
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 2
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        text = client.completions.create(model=str(tiny_chat_checkpoint), prompt=prompt, max_tokens=5,
                                         temperature=0.0, extra_body={"ignore_eos": True}).choices[0].text
        assert text == expected
        chat = client.chat.completions.create(model=str(tiny_chat_checkpoint), max_tokens=3,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content is not None
    finally:
        code = server.stop()
    assert code == 0
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def test_server_whose_rank_dies_answers_503_and_exits_non_zero(tiny_chat_checkpoint, tmp_path):
    import httpx

    from server_process import ServerProcess

    server = ServerProcess(tiny_chat_checkpoint, tmp_path / "log", "--tensor-parallel-size", "2",
                           "--num-kv-blocks", "64", "--max-model-len", "512")
    try:
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)  # the later-started rank
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            start = time.monotonic()
            r = http.post("/v1/completions", json={"model": str(tiny_chat_checkpoint), "prompt": [5, 6, 7],
                                                   "max_tokens": 4})
            assert r.status_code == 503, r.text
            assert time.monotonic() - start < 20
        server.proc.wait(timeout=30)
    finally:
        code = server.stop()
    assert code != 0
    assert "stopping" in server.output()
    assert not any(_alive(pid) for pid in workers)
