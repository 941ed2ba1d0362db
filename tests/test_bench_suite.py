"""`qwen-serve bench suite` on the CPU: a tiny random config (and a tiny checkpoint) with every length scaled
down, transformers included; the JSON must hold every section with sane figures and exact token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_checkpoint
from qwen_serve.bench.suite import step_times
from qwen_serve.cli import main

# Small enough for seconds on two cores; max_position_embeddings 160 holds the 128-token context plus its
# new tokens, and YaRN (factor 4 over 160) stretches it to 640 for the 256-token long context.
TINY = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=144, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=160,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float32",
            bos_token_id=318, eos_token_id=319)

SCALED_DOWN = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "160", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "48", "--repeats", "2", "--decode-prompt-len", "16",
               "--decode-new-tokens", "8", "--contexts", "64,128", "--context-new-tokens", "4",
               "--long-context-len", "256", "--long-context-new-tokens", "4", "--long-context-chunk", "96",
               "--throughput-requests", "8", "--throughput-input-len", "8", "32", "--throughput-output-len", "4", "8",
               "--transformers-batch-size", "3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy shared CPU two threads that wait on
    each other make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_batch1(figures: dict, prompt_len: int, new_tokens: int) -> None:
    assert figures["prompt_len"] == prompt_len and figures["new_tokens"] == new_tokens
    assert figures["ttft_s"] > 0 and figures["decode_tok_s"] > 0
    for run in figures.get("runs", [figures]):
        assert run["generated"] == new_tokens and run["prompt_len"] == prompt_len


def _check_throughput(figures: dict, requests: int) -> None:
    assert figures["requests"] == requests
    assert figures["output_tokens"] == figures["requested_output_tokens"]
    assert 4 * requests <= figures["output_tokens"] <= 8 * requests
    assert 8 * requests <= figures["prompt_tokens"] <= 32 * requests
    assert figures["output_tok_s"] > 0 and figures["total_tok_s"] > figures["output_tok_s"] and figures["wall_s"] > 0


def test_suite_on_a_tiny_random_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "suite.json"
    assert main(["bench", "suite", "--random-config", str(config), *SCALED_DOWN, "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())

    assert result["model"] == f"random:{config}" and result["dtype"] == "float32"
    assert result["command"].startswith("qwen-serve bench suite --random-config")
    assert result["versions"]["torch"] and result["versions"]["transformers"] and result["date"]
    ours, theirs = result["qwen_serve"], result["transformers"]
    for side in (ours, theirs):
        _check_batch1(side["decode"], 16, 8)
        # 128 + 4 new tokens fit the first engine's max_model_len (132): no prompt is clipped.
        assert set(side["contexts"]["lengths"]) == {"64", "128"}
        for length, figures in side["contexts"]["lengths"].items():
            _check_batch1(figures, int(length), 4)
        _check_batch1(side["long"], 252, 4)
    _check_throughput(ours["throughput"], 8)
    _check_throughput(theirs["throughput"], 8)
    assert ours["throughput"]["preemptions"] == 0
    steps = ours["throughput"]["steps"]
    assert {b["kind"] for b in steps} == {"decode", "prefill"}
    assert max(b["up_to"] for b in steps if b["kind"] == "decode") <= 8  # --max-num-seqs
    assert 0 < sum(b["s"] for b in steps) <= ours["throughput"]["wall_s"]
    assert theirs["throughput"]["sub_batches"] == 3 and theirs["throughput"]["batch_size"] == 3
    assert theirs["throughput"]["generated_tokens_with_surplus"] >= theirs["throughput"]["output_tokens"]
    assert ours["contexts"]["chunk"] == 48 and ours["long"]["chunk"] == 96
    assert ours["engine"]["max_model_len"] == 132 and ours["engine"]["max_num_seqs"] == 8
    assert ours["engine"]["kv_cache_tokens"] == 160 * 16 and ours["engine"]["contexts_32k"] == 0
    assert ours["long_engine"]["max_model_len"] == 256 and ours["long_engine"]["max_num_seqs"] == 1
    assert ours["decode"]["peak_gpu_gb"] is None  # no GPU here

    table = {row["figure"]: row for row in result["table"]}
    decode = table["decode b=1 prompt 16 + 8 new"]
    assert decode["ratio"] == pytest.approx(decode["qwen_serve"] / decode["transformers"])
    assert decode["target"] is None  # the goals are for the 7B workload's lengths
    printed = capsys.readouterr().out
    assert "decode b=1 prompt 16 + 8 new" in printed
    assert "throughput, 8 requests (transformers: 8 in sub-batches of 3): output" in printed
    assert "throughput steps, each from the step before's results to its own" in printed


@pytest.mark.parametrize("method", ["awq", "gptq", "gguf"])
def test_suite_on_random_quantized_weights(method: str, tmp_path: Path) -> None:
    """--quantization without --model: random codes in the layout of Qwen's releases (AWQ, GPTQ) or random
    Q4_K blocks with bfloat16 tables (GGUF); bfloat16 on the CPU, so the AWQ / GPTQ layers run torch's int4
    matmul and the GGUF ones their blocks' kernels (where those build). Q4_K's blocks of 256 inputs need a
    hidden size of 256."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "hidden_size": 256, "intermediate_size": 512, "torch_dtype": "bfloat16"}))
    out = tmp_path / "suite.json"
    args = ["bench", "suite", "--random-config", str(config), "--quantization", method, "--device", "cpu",
            "--dtype", "bfloat16", "--num-kv-blocks", "160", "--sections", "decode", "--transformers-sections",
            "none", "--repeats", "1", "--decode-prompt-len", "16", "--decode-new-tokens", "8", "--output-json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["quantization"] == method and result["qwen_serve"]["engine"]["quantization"] == method
    _check_batch1(result["qwen_serve"]["decode"], 16, 8)


def test_step_times_bucket_by_kind_and_size() -> None:
    """Each step's time runs from the step before's results to its own; decode steps (a token a sequence)
    by sequences, the rest by tokens, up to powers of two; the first step has no start and counts nowhere."""
    steps = [(0.0, 7, 7), (0.5, 100, 2), (0.6, 2, 2), (0.8, 3, 3), (0.85, 1, 1), (0.9, 5, 1), (1.0, 4, 4)]
    got = {(b["kind"], b["up_to"]): (b["steps"], round(b["s"], 6), round(b["ms_per_step"], 3))
           for b in step_times(steps)}
    assert got == {("prefill", 128): (1, 0.5, 500.0), ("decode", 2): (1, 0.1, 100.0),
                   ("decode", 4): (2, 0.3, 150.0), ("decode", 1): (1, 0.05, 50.0), ("prefill", 8): (1, 0.05, 50.0)}
    assert step_times(steps[:1]) == []


def test_suite_profiles_the_throughput_workload_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--profile-throughput N: the timed figures as without it, then the same workload on other prompts under
    torch's profiler; on the CPU its N operators with the most CPU time, largest first, within the total."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "suite.json"
    args = ["bench", "suite", "--random-config", str(config), *SCALED_DOWN, "--sections", "throughput",
            "--transformers-sections", "none", "--profile-throughput", "4", "--output-json", str(out)]
    assert main(args) == 0
    figures = json.loads(out.read_text())["qwen_serve"]["throughput"]
    _check_throughput(figures, 8)
    profile = figures["profile"]
    assert profile["wall_s"] > 0 and len(profile["top"]) == 4 and profile["pdl"] is False  # a CPU run
    times = [op["self_ms"] for op in profile["top"]]
    assert times == sorted(times, reverse=True) and 0 < sum(times) <= profile["total_self_ms"]
    assert all(op["calls"] >= 1 and op["name"] for op in profile["top"])
    assert "throughput under the profiler" in capsys.readouterr().out


def test_suite_on_a_checkpoint_with_sections_left_out(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path / "tiny", max_pos=160)
    out = tmp_path / "suite.json"
    args = ["bench", "suite", "--model", str(folder), *SCALED_DOWN, "--sections", "decode,long",
            "--transformers-sections", "long", "--repeats", "1", "--output-json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    ours, theirs = result["qwen_serve"], result["transformers"]
    assert set(ours) == {"engine", "decode", "long_engine", "long"}
    assert set(theirs) == {"long_model_load_s", "long"}
    _check_batch1(ours["decode"], 16, 8)
    _check_batch1(ours["long"], 252, 4)
    _check_batch1(theirs["long"], 252, 4)
    assert ours["engine"]["max_model_len"] == 24  # only the decode section's request


def test_suite_rejects_inconsistent_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    # 1024 positions exceed the 640 that YaRN gives this config.
    assert main(["bench", "suite", "--random-config", str(config), *SCALED_DOWN, "--long-context-len", "1024",
                 "--output-json", str(tmp_path / "x.json")]) == 2
    assert "exceeds the 640 positions" in capsys.readouterr().err
    # The decode request would stop at the 160 positions of the config, short of its new tokens.
    assert main(["bench", "suite", "--random-config", str(config), *SCALED_DOWN, "--decode-new-tokens", "150",
                 "--output-json", str(tmp_path / "x.json")]) == 2
    assert "the decode section needs 166 tokens of context; max_model_len is 160" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_targets_apply_to_the_workload_they_were_set_for() -> None:
    from qwen_serve.bench.suite import _rows

    def batch1(prompt_len: int, new_tokens: int, ttft_s: float, decode_tok_s: float) -> dict:
        return {"prompt_len": prompt_len, "new_tokens": new_tokens, "ttft_s": ttft_s, "decode_tok_s": decode_tok_s,
                "peak_gpu_gb": 20.0}

    ours = {"decode": batch1(128, 256, 0.012, 190.0),
            "contexts": {"lengths": {"16384": batch1(16384, 64, 0.4, 170.0), "32768": batch1(32704, 64, 1.0, 160.0)},
                         "peak_gpu_gb": 30.0},
            "long": batch1(131008, 64, 7.5, 120.0),
            "throughput": {"requests": 256, "output_tok_s": 6000.0, "total_tok_s": 12000.0, "wall_s": 23.0,
                           "preemptions": 0, "peak_gpu_gb": 74.0}}
    results = {"qwen_serve": ours, "transformers": {"decode": batch1(128, 256, 0.02, 40.0)},
               "settings": {"throughput_lens": [[100, 1024], [100, 1024]]}}
    rows = {r.figure.split(" (")[0]: r for r in _rows(results)}

    decode = rows["decode b=1 prompt 128 + 256 new"]
    assert (decode.target, decode.met(), decode.ratio()) == (185.0, True, pytest.approx(4.75))
    assert rows["TTFT prompt 128 + 256 new"].ratio() == pytest.approx(20 / 12)  # a time: theirs / ours
    assert (rows["TTFT at 32768"].target, rows["TTFT at 32768"].met()) == (950.0, False)
    assert rows["TTFT at 16384"].target is None and rows["TTFT at 16384"].ratio() is None  # no transformers figure
    long = rows["TTFT at 131072 with rope scaling"]
    assert (long.target, long.met()) == (8000.0, True)
    throughput = rows["throughput, 256 requests: output"]
    assert (throughput.target, throughput.met()) == (12000.0, False)
    results["settings"]["throughput_lens"] = [[100, 512], [100, 1024]]
    assert all(r.target is None for r in _rows(results) if r.figure.startswith("throughput"))
