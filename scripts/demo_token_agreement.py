"""Greedy output of the demo model served from its GGUF blocks (bfloat16; every layer through kernels/cpu_gguf.py
where it builds, else the 4-bit ones through torch's int4 matmul) against the same model dequantized (every layer a
plain bfloat16 weight, and float32): the share of generated tokens that agree, position by position, and where each
pair first diverges.

    python3 scripts/demo_token_agreement.py [--tokens 128]
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "Explain the difference between a process and a thread.",
    "用一句话介绍长城。",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "What does the `yield` keyword do in Python?",
    "Write a bash one-liner that counts lines in all .py files.",
    "Give three tips for writing readable code.",
    "Implement binary search in C.",
]


def greedy(dtype: str, tokens: int) -> list[list[int]]:
    from qwen_serve.engine.llm import LLM
    from qwen_serve.engine.sampling_params import SamplingParams

    llm = LLM("demo", device="cpu", dtype=dtype, max_model_len=1024, kv_cache_gb=0.25)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                    SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, list[int]]:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
    return same / sum(len(p) for p in a), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from qwen_serve.kernels import cpu_extension, int4pack

    served = greedy("bfloat16", args.tokens)
    supported, available = int4pack.supported, cpu_extension.available
    int4pack.supported, cpu_extension.available = (lambda *args: False), (lambda: False)  # plain weights, torch code
    try:
        plain_bf16 = greedy("bfloat16", args.tokens)
    finally:
        int4pack.supported, cpu_extension.available = supported, available
    plain_fp32 = greedy("float32", args.tokens)
    for name, ref in (("dequantized bfloat16", plain_bf16), ("dequantized float32", plain_fp32)):
        share, first = agreement(served, ref)
        print(f"served vs {name}: {share:.1%} of {len(PROMPTS) * args.tokens} tokens agree; first divergence at "
              f"{first} (of {args.tokens})")
    share, first = agreement(plain_bf16, plain_fp32)
    print(f"dequantized bfloat16 vs float32: {share:.1%}; first divergence at {first}")


if __name__ == "__main__":
    main()
