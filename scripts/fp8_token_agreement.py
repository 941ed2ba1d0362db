"""Top-1 agreement of the demo model with FP8 W8A8 linears (--quantization fp8's rule) with the same model
unquantized, over a long greedy run of the unquantized float32 model: teacher-forced, each position scored
given the run's tokens before it (free-running outputs part at the first differing token and are not
compared after it). The CPU has no FP8 matmul, so the FP8 side runs the method's float32 reference (the very values
the FP8 matmul multiplies, dequantized): the engine's refusal of the CPU is lifted for this script only.
The unquantized model is the demo GGUF as transformers dequantizes it, saved as a bfloat16 folder. The last
rows add the float8 KV cache (--kv-cache-dtype fp8), which the CPU runs as it is.

    python3 scripts/fp8_token_agreement.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from demo_token_agreement import PROMPTS


def dequantized_demo(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_serve.loader.demo import demo_gguf_path

    gguf = demo_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model read from GGUF: its tensors and config are written directly.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


def make_llm(folder: Path, dtype: str, quantization: str | None, kv_cache_dtype: str = "auto"):
    from qwen_serve.engine.llm import LLM

    return LLM(str(folder), device="cpu", dtype=dtype, max_model_len=1024, kv_cache_gb=0.25, quantization=quantization,
               kv_cache_dtype=kv_cache_dtype)


def top1_agreement(llm, sequences: list[list[int]], first_scored: list[int]) -> float:
    """Teacher-forced: the share of positions from first_scored[i] on where the model's most likely token
    is the sequence's token (prompt logprobs of the whole sequence, rank 1)."""
    from qwen_serve.engine.sampling_params import SamplingParams

    outs = llm.generate(sequences, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    hits = total = 0
    for out, start in zip(outs, first_scored):
        for token, position in zip(out.prompt_token_ids[start:], out.prompt_logprobs[start:]):
            hits += position[token].rank == 1
            total += 1
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from qwen_serve.engine.sampling_params import SamplingParams
    from qwen_serve.layers.quantization.fp8 import Fp8Config

    Fp8Config.check_device = lambda self, device, dtype: None  # the CPU runs the float32 reference
    with tempfile.TemporaryDirectory() as tmp:
        folder = dequantized_demo(Path(tmp))
        ref = make_llm(folder, "float32", None)
        outs = ref.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True), use_tqdm=False)
        sequences = [o.prompt_token_ids + o.outputs[0].token_ids for o in outs]
        first = [len(o.prompt_token_ids) for o in outs]
        ref.engine.close()
        print(f"greedy run: float32 unquantized, {len(PROMPTS)} prompts x {args.tokens} tokens; teacher-forced top-1 "
              "agreement with it:", flush=True)
        for dtype, quant, kv in (("float32", "fp8", "auto"), ("bfloat16", None, "auto"), ("bfloat16", "fp8", "auto"),
                                 ("bfloat16", None, "fp8"), ("bfloat16", "fp8", "fp8")):
            llm = make_llm(folder, dtype, quant, kv)
            cache = "" if kv == "auto" else f", {kv} KV cache"
            print(f"  {dtype} {quant or 'unquantized'}{cache}: {top1_agreement(llm, sequences, first):.2%}", flush=True)
            llm.engine.close()


if __name__ == "__main__":
    main()
