"""Where an engine step's wall time goes, on the suite's mixed-length throughput workload.

Wraps the engine's pieces with host timers and prints the time spent in scheduling, launching
(input preparation and kernel launches; a launch also blocks while the GPU's queue is full),
waiting for the GPU (the sampled tokens' event), and the rest of collecting (appending tokens, stop
checks, detokenizing, building outputs). On CUDA it also records an event just before each step's
forward pass is queued (after the host has built the step's inputs): the gaps between one step's
sampled tokens and the next step's forward pass, on the GPU's own clock, are the time the GPU sat
idle waiting for the host. (An event at the start of `launch` would miss the input building: with
the GPU already idle it fires at once, before the host has queued any of the step's work.)

With --host-profile N it also runs cProfile over the measured run and prints the N functions with
the most cumulative host time (cProfile slows the host about twofold; the shares stand).

With --kernels N it also runs torch's profiler (CUDA activity) over the measured run and prints the
N kernels that took the most GPU time (the profiler slows the host; the per-kernel times stand).

    python scripts/profile_steps.py --random-config 7b --num-prompts 256 --max-num-seqs 256 [--kernels 30]

One long prompt (the suite's long section, YaRN on the random 7B shape):

    python scripts/profile_steps.py --random-config 7b --rope-scaling yarn --max-model-len 131072 \
        --max-num-seqs 1 --max-num-batched-tokens 16384 --num-prompts 1 --min-len 131008 --max-len 131008 \
        --output-len 2 2 --kernels 30
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import defaultdict
from typing import Any, Callable

from qwen_serve.bench.offline import build_engine
from qwen_serve.bench.suite import mixed_work
from qwen_serve.config import EngineConfig
from qwen_serve.engine.sampling_params import RequestOutputKind, SamplingParams


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - start

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--random-config", default=None, help="7b | 0.5b | a config.json (random weights)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="output lengths, uniform (default: --min-len to --max-len, as the prompts)")
    parser.add_argument("--kernels", type=int, default=0, help="print the N kernels with the most GPU time")
    parser.add_argument("--host-profile", type=int, default=0,
                        help="print the N functions with the most cumulative host time (cProfile)")
    args = parser.parse_args()

    engine = build_engine(args)
    timers = Timers()
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.executor.runner, "launch", "launch")
    timers.wrap(engine.executor.runner.sampler, "collect", "collect: wait + tokens to host")
    timers.wrap(engine, "_collect", "collect: all")
    lengths = [args.min_len, args.max_len]
    out_lengths = args.output_len or lengths
    vocab = engine.model_config.vocab_size
    work = mixed_work(random.Random(0), vocab, args.num_prompts, lengths, out_lengths)
    # Warm-up on other prompts of the same lengths, so the prefix cache serves none of the measured ones.
    warm_up = mixed_work(random.Random("warm-up"), vocab, min(4, args.num_prompts), lengths, out_lengths)

    def run(batch) -> tuple[float, int, int]:
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(batch):
            engine.add_request(f"p-{start}-{i}", prompt, SamplingParams(
                temperature=0.0, max_tokens=out_len, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY))
        generated = steps = 0
        while engine.has_unfinished_requests():
            generated += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
            steps += 1
        return time.perf_counter() - start, generated, steps

    starts: list[Any] = []  # (CUDA event before the step's forward pass, the step's handle)
    if engine.device.type == "cuda":
        runner = engine.executor.runner
        forward_events: list[Any] = []  # the event of the launch in progress, if it ran a forward pass
        for owner, name in ((runner, "_forward_eager"), (runner.graphs, "run")):
            if owner is not None:
                setattr(owner, name, _marked(getattr(owner, name), forward_events))
        launch = runner.launch

        def marked_launch(sched: Any) -> Any:
            forward_events.clear()
            handle = launch(sched)
            if forward_events:
                starts.append((forward_events[0], handle))
            return handle

        runner.launch = marked_launch
        runner.sampler.launch = _timed_sampler_launch(runner.sampler.launch)

    run(warm_up)
    timers.total.clear()
    starts.clear()
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            seconds, generated, steps = run(work)
        _print_kernels(prof, args.kernels)
    elif args.host_profile:
        host = cProfile.Profile()
        seconds, generated, steps = host.runcall(run, work)
        pstats.Stats(host).sort_stats("cumulative").print_stats(args.host_profile)
    else:
        seconds, generated, steps = run(work)
    t = timers.total
    wait = t["collect: wait + tokens to host"]
    print(f"{generated} tokens in {seconds:.2f} s ({generated / seconds:,.0f} tok/s), {steps} steps, "
          f"{seconds / steps * 1e3:.2f} ms per step")
    rows = [("schedule", t["schedule"]), ("launch (inputs + kernel launches)", t["launch"]),
            ("collect: wait for the GPU + copy", wait), ("collect: tokens, stops, outputs", t["collect: all"] - wait),
            ("other (engine.step rest, benchmark loop)",
             seconds - t["schedule"] - t["launch"] - t["collect: all"])]
    for name, value in rows:
        print(f"  {name:<42} {value:7.2f} s  {value / steps * 1e3:7.3f} ms/step")
    if starts:
        idle = _gpu_idle_ms(starts)
        print(f"  GPU idle between steps (GPU clock)        {idle / 1e3:7.2f} s  {idle / steps:7.3f} ms/step")


def _print_kernels(prof: Any, top: int) -> None:
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    print(f"GPU time in kernels and copies: {total / 1e6:.2f} s")
    for e in events[:top]:
        t = e.self_device_time_total
        print(f"  {t / 1e6:7.3f} s {100 * t / total:5.1f}%  {e.count:8d}x  {t / e.count:9.1f} us  {e.key[:110]}")


def _marked(forward: Callable[..., Any], events: list[Any]) -> Callable[..., Any]:
    """`forward` that first records a timing event on the current stream into `events`."""
    import torch

    def marked(*args: Any, **kwargs: Any) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        return forward(*args, **kwargs)

    return marked


def _timed_sampler_launch(launch: Callable[..., Any]) -> Callable[..., Any]:
    """The sampler's launch with a timing-enabled `ready` event (the engine's own has no timing)."""
    import torch

    def timed(*args: Any) -> Any:
        pending = launch(*args)
        pending.ready = torch.cuda.Event(enable_timing=True)
        pending.ready.record()
        return pending

    return timed


def _gpu_idle_ms(starts: list[Any]) -> float:
    """Sum over consecutive sampling steps of (next step's start - this step's sampled tokens), when positive."""
    import torch

    torch.cuda.synchronize()
    idle, last_ready = 0.0, None
    for start, handle in starts:
        if last_ready is not None:
            idle += max(0.0, last_ready.elapsed_time(start))
        if handle.sample is not None:
            last_ready = handle.sample.ready
    return idle


if __name__ == "__main__":
    main()
