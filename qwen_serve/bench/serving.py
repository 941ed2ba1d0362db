"""`qwen-serve bench serve`: a load generator against a running OpenAI-compatible server.

Like vLLM's serving benchmark: N requests sent at a Poisson or fixed rate (or all at once), each
streamed, timing the first token and every chunk after it. Reports request throughput, output
tokens/s and mean / p50 / p99 of time to first token (TTFT), time per output token (TPOT),
inter-token latency (ITL, between streamed chunks) and end-to-end latency.

Random prompts are random token ids sent as token-id prompts to /v1/completions, so their lengths
are exact; for the chat endpoint they are first turned into text with the server's /detokenize.
Everything random comes from `--seed`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                        help="/v1/completions (token-id prompts, exact lengths) or /v1/chat/completions")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="API key (default: $QWEN_SERVE_API_KEY)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second; inf sends all at once (default: inf)")
    parser.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson",
                        help="gaps between requests: exponential (Poisson process) or constant")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--input-len", default="128",
                        help="prompt length in tokens, or a comma-separated list of lengths to cycle through")
    parser.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="draw each length uniformly from [len*(1-r), len*(1+r)] (default: 0, exact)")
    parser.add_argument("--prompt-file", default=None,
                        help="given prompts instead of random ones: a text file (one per line) or JSONL with 'prompt'")
    parser.add_argument("--token-id-range", default="1000,30000",
                        help="random prompt token ids are drawn from [lo, hi) (default: %(default)s)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate exactly --output-len tokens (default: on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--result-json", default=None, help="also write the results to this file")


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _lengths(spec: str, n: int, ratio: float, rng: random.Random) -> list[int]:
    base = [int(x) for x in spec.split(",") if x.strip()]
    if not base or any(b < 1 for b in base):
        raise ValueError(f"--input-len: expected positive integers, got {spec!r}")
    out = []
    for i in range(n):
        length = base[i % len(base)]
        if ratio > 0:
            length = rng.randint(max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio))))
        out.append(length)
    return out


def _read_prompts(path: str) -> list[str]:
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        return [json.loads(ln)["prompt"] for ln in lines]
    return lines


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _gaps(n: int, rate: float, arrival: str, rng: random.Random) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("--request-rate must be positive")
    return [rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_len: int, timeout: float) -> RequestResult:
    res = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])
                    return res
                if msg.get("usage"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
                    res.prompt_len = msg["usage"]["prompt_tokens"]
                for choice in msg.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.error = f"{type(err).__name__}: {err}"
        return res
    res.e2e = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0
    if not res.ok:
        res.error = "no tokens streamed"
    return res


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    api_key = args.api_key or os.environ.get("QWEN_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits, timeout=args.timeout) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]

        prompts: list[str | list[int]]
        if args.prompt_file:
            given = _read_prompts(args.prompt_file)
            prompts = [given[i % len(given)] for i in range(args.num_prompts)]
            prompt_lens = [0] * args.num_prompts  # taken from the usage the server reports
        else:
            lo, hi = (int(x) for x in args.token_id_range.split(","))
            prompt_lens = _lengths(args.input_len, args.num_prompts, args.range_ratio, rng)
            prompts = [[rng.randrange(lo, hi) for _ in range(n)] for n in prompt_lens]
            if args.endpoint == "chat":
                texts = []
                for ids in prompts:
                    r = await client.post("/detokenize", json={"model": model, "tokens": ids})
                    r.raise_for_status()
                    texts.append(r.json()["prompt"])
                prompts = texts

        url = "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"
        common = {"model": model, "max_tokens": args.output_len, "stream": True, "temperature": 0.0,
                  "ignore_eos": args.ignore_eos, "stream_options": {"include_usage": True}}

        def body(p: str | list[int]) -> dict[str, Any]:
            if args.endpoint == "completions":
                return {**common, "prompt": p}
            return {**common, "messages": [{"role": "user", "content": p}]}

        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(p: str | list[int], n: int) -> RequestResult:
            if gate is None:
                return await _one(client, url, body(p), n, args.timeout)
            async with gate:
                return await _one(client, url, body(p), n, args.timeout)

        tasks = []
        start = time.perf_counter()
        for p, n, gap in zip(prompts, prompt_lens, _gaps(args.num_prompts, args.request_rate, args.arrival, rng)):
            tasks.append(asyncio.create_task(limited(p, n)))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args, model)


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace, model: str) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    ttft = [r.ttft * 1000 for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    itl = [x * 1000 for r in ok for x in r.itl]
    e2e = [r.e2e * 1000 for r in ok]

    def stats(values: list[float]) -> dict[str, float]:
        mean = sum(values) / len(values) if values else 0.0
        return {"mean": mean, "p50": _percentile(values, 50), "p99": _percentile(values, 99)}

    return {
        "model": model, "endpoint": args.endpoint, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:5],
        "request_rate": args.request_rate, "arrival": args.arrival, "max_concurrency": args.max_concurrency,
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2e_ms": stats(e2e),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(name: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{name:<40}{value:>10{fmt}}")

    row("Successful requests:", r["completed"])
    row("Failed requests:", r["failed"])
    row("Benchmark duration (s):", r["duration_s"], ".2f")
    row("Total input tokens:", r["total_input_tokens"])
    row("Total generated tokens:", r["total_output_tokens"])
    row("Request throughput (req/s):", r["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", r["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", r["total_token_throughput"], ".2f")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        short = key.split("_")[0].upper()
        row(f"Mean {short} (ms):", r[key]["mean"], ".2f")
        row(f"P50 {short} (ms):", r[key]["p50"], ".2f")
        row(f"P99 {short} (ms):", r[key]["p99"], ".2f")
    lines.append("=" * 50)
    for err in r["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        print("qwen-serve bench serve: --num-prompts must be at least 1", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(benchmark(args))
    except (ValueError, httpx.HTTPError) as err:
        print(f"qwen-serve bench serve: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1

