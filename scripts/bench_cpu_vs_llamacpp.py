"""The demo model on the CPU, batch 1, qwen-serve beside llama.cpp (llama-cpp-python) on the same GGUF file:
resident memory after load and after decoding (mapped file pages count once touched), TTFT of a chat prompt
and greedy decode tok/s over 64 tokens, best of 3, each engine in its own process (so each RSS is its own).
llama-cpp-python is a benchmark peer, not a dependency:
`pip install llama-cpp-python` builds it (~10 minutes on 2 cores).

    python3 scripts/bench_cpu_vs_llamacpp.py            # both, one after the other
    python3 scripts/bench_cpu_vs_llamacpp.py --engine ours|llamacpp --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring."
NEW_TOKENS, RUNS = 64, 3


def rss_gib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30


def prompt_text() -> str:
    from qwen_serve.loader.resolve import resolve_model
    from qwen_serve.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(resolve_model("demo"))
    return tok.apply_chat_template([{"role": "user", "content": PROMPT}])


def run_ours(threads: int, fused_kernels: bool = True) -> dict:
    import torch

    torch.set_num_threads(threads)
    from qwen_serve.config import EngineConfig
    from qwen_serve.engine.llm_engine import LLMEngine
    from qwen_serve.engine.sampling_params import SamplingParams

    # A KV cache for this one prompt (the default 2 GiB would dominate the memory figure).
    engine = LLMEngine.from_config(EngineConfig(model="demo", device="cpu", max_model_len=1024, kv_cache_gb=0.05,
                                                   fused_kernels=fused_kernels))
    rss = rss_gib()
    ids = engine.tokenizer.encode(prompt_text())
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = []
    for run in range(RUNS):
        engine.add_request(str(run), ids, params)
        start, first = time.perf_counter(), None
        while engine.has_unfinished_requests():
            engine.step()
            first = first if first is not None else time.perf_counter() - start
        results.append((first, (NEW_TOKENS - 1) / (time.perf_counter() - start - first)))
    name = "qwen-serve" if fused_kernels else "qwen-serve --no-fused-kernels"
    return {"engine": name, "prompt_tokens": len(ids), "rss_after_load_gib": rss,
            "rss_after_decode_gib": rss_gib(), "ttft_ms": min(r[0] for r in results) * 1e3,
            "decode_tok_s": max(r[1] for r in results)}


def run_llamacpp(threads: int) -> dict:
    from llama_cpp import Llama

    from qwen_serve.loader.demo import demo_gguf_path

    llm = Llama(model_path=str(demo_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                verbose=False)
    rss = rss_gib()
    ids = llm.tokenize(prompt_text().encode(), add_bos=False, special=True)
    results = []
    for _ in range(RUNS):
        llm.reset()
        start, first, n = time.perf_counter(), None, 0
        for _token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            n += 1
            first = first if first is not None else time.perf_counter() - start
            if n == NEW_TOKENS:
                break
        results.append((first, (NEW_TOKENS - 1) / (time.perf_counter() - start - first)))
    return {"engine": "llama.cpp", "prompt_tokens": len(ids), "rss_after_load_gib": rss,
            "rss_after_decode_gib": rss_gib(), "ttft_ms": min(r[0] for r in results) * 1e3,
            "decode_tok_s": max(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ours", "llamacpp"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fused-kernels", action="store_true",
                        help="ours with the torch attention and RMSNorm (A/B)")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_ours(args.threads, not args.no_fused_kernels) if args.engine == "ours"
                         else run_llamacpp(args.threads)))
        return
    for engine in ("llamacpp", "ours"):
        out = subprocess.run([sys.executable, __file__, "--engine", engine, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
