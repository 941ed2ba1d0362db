"""Prompt-lookup speculative decoding beside plain decoding, batch 1, the same engine settings and prompts in
one run: decode tok/s after the first token, acceptance, and whether the greedy tokens agree.

    python3 scripts/bench_spec.py [--model demo] [--device cpu] [--k 4] [--max-tokens 160]
Workloads: code editing (the answer repeats most of the prompt's code) and plain chat (nothing to look up).
"""

from __future__ import annotations

import argparse
import time

import torch

CODE = '''def summarize(orders):
    total = 0
    count = 0
    largest = None
    for order in orders:
        if order.get("status") != "paid":
            continue
        amount = order["amount"]
        total += amount
        count += 1
        if largest is None or amount > largest:
            largest = amount
    average = total / count if count else 0
    return {"total": total, "count": count, "average": average, "largest": largest}
'''
WORKLOADS = {
    "code editing": "Rename the variable `total` to `revenue` everywhere in this function and return the whole "
                    "function, nothing else:\n```python\n" + CODE + "```",
    "plain chat": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(engine, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy output tokens and decode tok/s after the first token."""
    from qwen_serve.engine.sampling_params import SamplingParams

    engine.add_request(f"r{time.monotonic_ns()}", ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    first, out = None, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        first = first if first is not None else time.perf_counter()
    tokens = list(out.outputs[0].token_ids)
    return tokens, (len(tokens) - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    from qwen_serve.config import EngineConfig
    from qwen_serve.engine.llm_engine import LLMEngine

    spec = f'{{"method": "ngram", "num_speculative_tokens": {args.k}}}'
    engines = {name: LLMEngine.from_config(EngineConfig(model=args.model, device=args.device, speculative_config=s))
               for name, s in (("plain", None), ("ngram", spec))}
    tok = engines["plain"].tokenizer
    for workload, text in WORKLOADS.items():
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        results = {}
        for name, engine in engines.items():
            run(engine, ids, 8)  # warm-up
            before = engine.stats()
            tokens, speed = run(engine, ids, args.max_tokens)
            after = engine.stats()
            drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
            accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
            steps = after.spec_num_drafts - before.spec_num_drafts
            results[name] = (tokens, speed)
            extra = (f", {accepted}/{drafts} drafts accepted ({accepted / drafts:.0%}), mean acceptance length "
                     f"{1 + accepted / steps:.2f}" if drafts else "")
            print(f"{workload:13s} {name:6s} {len(tokens):4d} tokens  {speed:6.1f} tok/s{extra}", flush=True)
        same = results["plain"][0] == results["ngram"][0]
        print(f"{workload:13s} speed-up {results['ngram'][1] / results['plain'][1]:.2f}x, greedy tokens "
              f"{'identical' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
