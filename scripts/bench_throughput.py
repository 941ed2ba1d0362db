"""Offline throughput on mixed lengths: N requests, input and output lengths uniform in [lo, hi], ignore_eos.

The workload of issue 7's throughput figure (256 requests, 100-1024 tokens in and out). Works on any
model spec or on random weights of a named shape:

    python scripts/bench_throughput.py --random-config 7b --num-prompts 256 --min-len 100 --max-len 1024 \
        --max-num-seqs 256 --max-num-batched-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from qwen_serve.bench.offline import _build_engine
from qwen_serve.config import EngineConfig
from qwen_serve.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--random-config", default=None, help="7b | 0.5b | a config.json (random weights)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--output-json", default="bench-throughput.json")
    args = parser.parse_args()

    engine = _build_engine(args)
    rng = random.Random(0)
    vocab = min(engine.model_config.vocab_size, 10000)  # ordinary text ids, no special tokens
    work = [([rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))],
             rng.randint(args.min_len, args.max_len)) for _ in range(args.num_prompts)]

    def run(batch: list[tuple[list[int], int]]) -> tuple[float, int]:
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(batch):
            engine.add_request(f"tp-{start}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
        generated = 0
        while engine.has_unfinished_requests():
            generated += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
        return time.perf_counter() - start, generated

    run(work[:4])  # warm-up: compiles, first allocations
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds, generated = run(work)
    prompt_tokens = sum(len(p) for p, _ in work)
    result = {
        "model": args.random_config or args.model, "device": str(engine.device),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "num_prompts": args.num_prompts, "len_range": [args.min_len, args.max_len],
        "prompt_tokens": prompt_tokens, "generated_tokens": generated, "seconds": round(seconds, 2),
        "output_tok_s": round(generated / seconds, 1), "total_tok_s": round((generated + prompt_tokens) / seconds, 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if torch.cuda.is_available() else None,
        "preemptions": engine.stats().num_preemptions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=1))
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
