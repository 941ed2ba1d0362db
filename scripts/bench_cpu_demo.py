"""The engine on the CPU, batch 1: build time, resident memory after the build (the KV cache of
--kv-cache-gb included), then TTFT and decode tok/s of one chat prompt, twice (the first run warms up).

    python3 scripts/bench_cpu_demo.py [MODEL]        # default: demo
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def rss_gib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30


def main() -> None:
    torch.set_num_threads(2)
    from qwen_serve.config import EngineConfig
    from qwen_serve.engine.llm_engine import LLMEngine
    from qwen_serve.engine.sampling_params import SamplingParams

    start = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(model=sys.argv[1] if len(sys.argv) > 1 else "demo", device="cpu"))
    print(f"engine built {time.perf_counter() - start:.1f} s, RSS now {rss_gib():.2f} GiB, "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a Python function that checks "
                                               "whether a number is prime, with a docstring."}]))
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for run in range(2):
        engine.add_request(f"r{run}", ids, params)
        start, first = time.perf_counter(), None
        while engine.has_unfinished_requests():
            engine.step()
            first = first if first is not None else time.perf_counter() - start
        total = time.perf_counter() - start
        print(f"prompt {len(ids)}: TTFT {first * 1e3:.0f} ms, decode {(params.max_tokens - 1) / (total - first):.1f} tok/s")


if __name__ == "__main__":
    main()
