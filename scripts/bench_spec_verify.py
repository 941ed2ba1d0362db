"""The cost of a speculative verify step on the device: batch-1 decode of random weights of a shape (7B by
default) with k = 0 (plain decode, CUDA graphs) and with k drafts every step (one forward of 1 + k rows,
each sampled, replayed from the verify graphs), and the batch-1 tok/s that implies at a per-draft acceptance
rate `alpha`: (1 - alpha^(k + 1)) / (1 - alpha) tokens a step. The proposer is replaced by one that always proposes k
tokens (random weights accept almost none), so every step verifies k drafts.

    python3 scripts/bench_spec_verify.py --k 0,1,2,4,8 --alpha 0.83,0.21
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch


class EveryStepDrafts:
    """Stands in for the proposer: k drafts each step (copies of the last token)."""

    def __init__(self, k: int) -> None:
        self.num_speculative_tokens = k

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        return token_ids[-1:] * min(self.num_speculative_tokens, max_tokens)


def step_ms(k: int, shape: str, prompt_len: int, new_tokens: int, device: str) -> tuple[float, float]:
    """(ms a decode step, tokens a step) for batch 1 with k drafts a step."""
    from qwen_serve.bench.offline import random_model_config
    from qwen_serve.config import EngineConfig
    from qwen_serve.engine.llm_engine import LLMEngine
    from qwen_serve.engine.sampling_params import SamplingParams

    spec = None if k == 0 else json.dumps({"method": "ngram", "num_speculative_tokens": k})
    engine = LLMEngine(EngineConfig(model="random", device=device, dtype="bfloat16", max_model_len=4096,
                                    speculative_config=spec), folder=None, model_config=random_model_config(shape))
    if k:
        engine.scheduler.proposer = EveryStepDrafts(k)
    prompt = torch.randint(0, 150000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    result = None
    for run in range(2):  # the first warms up (compiles, cuDNN plans)
        engine.add_request(f"r{run}", prompt, params)
        steps, first = 0, None
        while engine.has_unfinished_requests():
            engine.step()
            if device == "cuda":
                torch.cuda.synchronize()
            steps += 1
            if first is None:
                first = time.perf_counter()
        elapsed = time.perf_counter() - first
        result = (elapsed / (steps - 1) * 1e3, (new_tokens - 1) / (steps - 1))
    engine.close()
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", default="0,1,2,4,8")
    parser.add_argument("--alpha", default="0.83,0.21", help="per-draft acceptance rates to project")
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=129)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of a small shape")
    args = parser.parse_args()
    alphas = [float(a) for a in args.alpha.split(",")]
    base = None
    for k in (int(x) for x in args.k.split(",")):
        ms, per_step = step_ms(k, args.shape, args.prompt_len, args.new_tokens, args.device)
        base = base or ms
        implied = "  ".join(f"alpha {a:.2f}: {(1 - a ** (k + 1)) / (1 - a) / ms * 1e3:6.1f} tok/s" for a in alphas)
        print(f"k={k}: {ms:6.2f} ms a step ({ms / base:.2f}x plain), {per_step:.2f} tokens a step here; "
              f"implied {implied}", flush=True)


if __name__ == "__main__":
    main()
