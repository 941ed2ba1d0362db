"""Load-time benchmark: resolve a model spec (assembling/converting on first use), build the model
and the tokenizer, and report wall times and this process's peak RSS as one JSON line.

    QWEN_SERVE_CACHE=/tmp/fresh python scripts/bench_load.py --model demo --dtype float32   # first load
    QWEN_SERVE_CACHE=/tmp/fresh python scripts/bench_load.py --model demo --dtype float32   # second load

Run each load in a fresh process: peak RSS (ru_maxrss) covers the whole process lifetime.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from qwen_serve.loader.model_loader import load_model, load_model_config, resolve_dtype
    from qwen_serve.loader.resolve import resolve_model
    from qwen_serve.tokenizer.tokenizer import Tokenizer

    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    t_resolve = time.perf_counter() - t0
    cfg = load_model_config(folder)
    dtype = resolve_dtype(args.dtype, "cpu", cfg)
    model = load_model(folder, cfg, dtype, "cpu")
    tokenizer = Tokenizer.from_folder(folder)
    total = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({
        "model": args.model, "dtype": str(dtype).removeprefix("torch."),
        "resolve_s": round(t_resolve, 2), "total_s": round(total, 2),
        "weights_gib": round(weight_bytes / 2**30, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "vocab": tokenizer.vocab_size,
    }))


if __name__ == "__main__":
    main()
