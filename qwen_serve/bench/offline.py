"""`qwen-serve bench`: offline latency and throughput of the engine, optionally beside transformers.

Measures, on fixed-seed random prompts of `--input-len` tokens:
- batch 1: time to first token (prefill) and decode tokens/s over `--output-len` tokens;
- `--num-prompts` requests submitted at once: generated tokens/s for the whole batch.
`--compare-transformers` times transformers' `generate` on the same prompts, same dtype, same run.
`--random-config 7b|0.5b|path.json` benchmarks a model shape with random weights (no checkpoint).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qwen_serve.models.config import ModelConfig

# Named shapes for random-weight runs (MODELS.md): Qwen2.5-7B-Instruct and Qwen2.5-0.5B.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16",
               bos_token_id=151643, eos_token_id=151645),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="bfloat16",
                 bos_token_id=151643, eos_token_id=151643),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    from qwen_serve.config import EngineConfig

    EngineConfig.add_cli_args(parser)
    parser.add_argument("--random-config", default=None,
                        help="benchmark random weights of a shape: 7b, 0.5b or a config.json path (instead of --model)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request (default: 64)")
    parser.add_argument("--num-prompts", type=int, default=32, help="concurrent requests for the throughput run (default: 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a busy shared CPU 1 thread is steadier)")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="also time transformers' generate on the same prompts and dtype")
    parser.add_argument("--repeats", type=int, default=3, help="batch-1 runs per engine; the best is reported (default: 3)")
    parser.add_argument("--output-json", default="bench-offline.json", help="where to write the results (default: bench-offline.json)")


def random_model_config(spec: str) -> ModelConfig:
    """A named shape (NAMED_CONFIGS) or a config.json path, for random weights."""
    from qwen_serve.models.config import ModelConfig

    if spec in NAMED_CONFIGS:
        return ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], **NAMED_CONFIGS[spec]}, source=spec)
    return ModelConfig.from_file(Path(spec))


def with_rope_scaling(cfg: ModelConfig, rope_scaling: str) -> ModelConfig:
    """A random shape with YaRN: 'yarn' stretches the shape's own window 4x (the 7B's: 32,768 -> 131,072)."""
    block = {} if rope_scaling == "yarn" else json.loads(rope_scaling)
    return cfg.with_yarn(block.get("factor", 4.0), block.get("original_max_position_embeddings"))


def build_engine(args: argparse.Namespace):
    """The engine `qwen-serve bench` measures: a model from the flags, or random weights of --random-config
    (with --rope-scaling applied to that shape, as a checkpoint's config gets it)."""
    from qwen_serve.config import EngineConfig
    from qwen_serve.engine.llm_engine import LLMEngine

    config = EngineConfig.from_cli_args(args)
    if args.random_config:
        model_config = random_model_config(args.random_config)
        if config.rope_scaling:
            model_config = with_rope_scaling(model_config, config.rope_scaling)
        return LLMEngine(config, folder=None, model_config=model_config)
    return LLMEngine.from_config(config)


def _prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    # Ids below 10000 are ordinary text tokens in Qwen's vocabulary (no special tokens).
    return torch.randint(0, min(vocab, 10000), (n, length), generator=gen).tolist()


def _timing(start: float, first: float, end: float, cpu: tuple[float, float, float], generated: int,
            output_len: int, decode_phase: tuple[float, int]) -> dict[str, float]:
    """Wall-clock figures plus decode tokens per CPU-second (process time: steadier on a shared machine).

    decode_phase: (time when every prompt had its first token, tokens generated by then).
    """
    decode_steps = output_len - 1
    all_first, generated_then = decode_phase
    return {"ttft_s": first - start, "total_s": end - start, "generated": generated,
            "decode_tok_s": decode_steps / (end - first) if decode_steps else 0.0,
            "decode_tok_per_cpu_s": decode_steps / max(cpu[2] - cpu[1], 1e-9) if decode_steps else 0.0,
            "throughput_tok_s": generated / (end - start),
            "decode_phase_tok_s": (generated - generated_then) / max(end - all_first, 1e-9)}


def _engine_batch(engine, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """Submits all prompts at once; time to first token, decode rate after it, whole-batch throughput."""
    from qwen_serve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{start}-{i}", p, params)
    first = cpu_first = None
    started: set[str] = set()
    decode_phase = (start, 0)
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.outputs[0].delta_token_ids)
            if first is None:
                first, cpu_first = time.perf_counter(), time.process_time()
            if out.request_id not in started:
                started.add(out.request_id)
                if len(started) == len(prompts):
                    decode_phase = (time.perf_counter(), generated)
    return _timing(start, first, time.perf_counter(), (cpu_start, cpu_first, time.process_time()), generated,
                   output_len, decode_phase)


class FirstTokenClock:
    """A transformers streamer that only notes when the first generated tokens arrive.

    generate() hands the streamer device tensors before anything waits for them, so on a GPU the clock
    synchronizes first: otherwise it would read the time the prefill was queued, not when it ended.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.first = self.cpu_first = 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            if value.is_cuda:
                import torch

                torch.cuda.synchronize(value.device)
            self.first, self.cpu_first = time.perf_counter(), time.process_time()

    def end(self) -> None:
        pass


def _transformers_batch(model, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    import torch

    ids = torch.tensor(prompts)
    clock = FirstTokenClock()
    with torch.inference_mode():
        start, cpu_start = time.perf_counter(), time.process_time()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                       do_sample=False, eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None,
                       streamer=clock)
        end, cpu_end = time.perf_counter(), time.process_time()
    # One forward pass gives every prompt its first token.
    return _timing(start, clock.first, end, (cpu_start, clock.cpu_first, cpu_end), len(prompts) * output_len,
                   output_len, (clock.first, len(prompts)))


def load_transformers(model_config: ModelConfig, folder: Path | None, dtype: torch.dtype, device: torch.device):
    """transformers' Qwen2ForCausalLM of the same config (rope scaling included) and dtype on `device`:
    random weights made on the device itself when `folder` is None, else the folder's checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config as HFConfig, Qwen2ForCausalLM

    hf_config = HFConfig(**model_config.raw)
    if folder is None:
        # Made on the device: on the CPU a 7B shape would first need ~30 GB of float32 and a slow random init.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        model = Qwen2ForCausalLM.from_pretrained(folder, config=hf_config, dtype=dtype)
    return model.to(device).eval()


def _load_transformers(engine, args: argparse.Namespace):
    folder = None
    if not args.random_config:
        from qwen_serve.loader.resolve import resolve_model

        folder = resolve_model(args.model)
    return load_transformers(engine.model_config, folder, engine.dtype, engine.device)


def run(args: argparse.Namespace) -> int:
    """The CLI entry: measures, prints the table, writes the JSON; returns the exit status."""
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    vocab = engine.model_config.vocab_size
    warm = _prompts(vocab, 1, min(16, args.input_len), seed=1)
    # A fresh prompt per repeat: a repeated one would be served from the prefix cache.
    single_prompts = [_prompts(vocab, 1, args.input_len, seed=100 + r) for r in range(args.repeats)]
    batch_prompts = _prompts(vocab, args.num_prompts, args.input_len, seed=2)
    _engine_batch(engine, warm, 2)  # warm-up: first-call allocations, thread pools
    hf = None
    if args.compare_transformers:
        hf = _load_transformers(engine, args)
        _transformers_batch(hf, warm, 2)
    # Batch 1 is short and a shared machine is noisy: alternate the two engines, keep each one's best.
    ours_b1, hf_b1 = [], []
    for single_prompt in single_prompts:
        ours_b1.append(_engine_batch(engine, single_prompt, args.output_len))
        if hf is not None:
            hf_b1.append(_transformers_batch(hf, single_prompt, args.output_len))
    results: dict[str, Any] = {
        "model": args.random_config and f"random:{args.random_config}" or args.model,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
        "qwen_serve": {"batch1": _best(ours_b1), "batch1_runs": ours_b1,
                       f"batch{args.num_prompts}": _engine_batch(engine, batch_prompts, args.output_len)},
    }
    if hf is not None:
        results["transformers"] = {"batch1": _best(hf_b1), "batch1_runs": hf_b1,
                                   f"batch{args.num_prompts}": _transformers_batch(hf, batch_prompts, args.output_len)}
    _print_table(results)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per figure, the best of the runs (the least disturbed by other processes)."""
    return {"ttft_s": min(r["ttft_s"] for r in runs),
            **{k: max(r[k] for r in runs) for k in ("decode_tok_s", "decode_tok_per_cpu_s", "throughput_tok_s")}}


def _print_table(r: dict[str, Any]) -> None:
    n = r["num_prompts"]
    print(f"model {r['model']}  dtype {r['dtype']}  device {r['device']}  ({r['machine']})")
    print(f"input {r['input_len']} tokens, output {r['output_len']} tokens, {n} concurrent; batch 1: best of the runs")
    print(f"{'engine':<14}{'TTFT b1 (ms)':>14}{'decode b1 (tok/s)':>19}{'b1 tok/CPU-s':>14}"
          f"{f'b{n} (gen tok/s)':>18}{'b' + str(n) + '/b1':>9}{f'b{n} decode phase':>18}{'/b1':>6}")
    for name in ("qwen_serve", "transformers"):
        if name not in r:
            continue
        b1, bn = r[name]["batch1"], r[name][f"batch{n}"]
        print(f"{name:<14}{b1['ttft_s'] * 1000:>14.1f}{b1['decode_tok_s']:>19.2f}{b1['decode_tok_per_cpu_s']:>14.2f}"
              f"{bn['throughput_tok_s']:>18.2f}{bn['throughput_tok_s'] / b1['decode_tok_s']:>9.1f}"
              f"{bn['decode_phase_tok_s']:>18.2f}{bn['decode_phase_tok_s'] / b1['decode_tok_s']:>6.1f}")
    if "transformers" in r:
        ours, theirs = r["qwen_serve"], r["transformers"]
        print(f"qwen_serve / transformers: batch-1 decode {ours['batch1']['decode_tok_s'] / theirs['batch1']['decode_tok_s']:.2f}x "
              f"(per CPU-s {ours['batch1']['decode_tok_per_cpu_s'] / theirs['batch1']['decode_tok_per_cpu_s']:.2f}x), "
              f"batch-{n} throughput {ours[f'batch{n}']['throughput_tok_s'] / theirs[f'batch{n}']['throughput_tok_s']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen-serve bench", description=__doc__.splitlines()[0])
    add_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
