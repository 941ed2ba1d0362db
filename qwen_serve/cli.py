"""The `qwen-serve` command: `serve`, `bench` (offline engine benchmark), `bench suite` / `bench-suite`
(every headline figure in one run, beside transformers), `bench serve` / `bench-serve` (load generator against a
running server).

Each subcommand's module is imported only when that subcommand runs, so `--help` stays quick and
the server never imports the benchmark code.
"""

from __future__ import annotations

import argparse
import shlex
import sys

# `qwen-serve bench <mode> ...` is the command `bench-<mode> ...`.
BENCH_MODES = ("serve", "suite")


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-serve", description="Serve Qwen2.5 models with an OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,bench,bench-suite,bench-serve}")

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server (and chat page)")
    if command == "serve":
        from qwen_serve.server.launch import add_serve_args

        add_serve_args(serve)

    bench = sub.add_parser("bench", help="offline engine benchmark ('bench suite': every headline figure, beside "
                                         "transformers; 'bench serve': load-test a running server)")
    if command == "bench":
        from qwen_serve.bench.offline import add_args

        add_args(bench)

    bench_suite = sub.add_parser("bench-suite", help="batch-1 decode, long-context TTFT, throughput and memory in one run, beside transformers")
    if command == "bench-suite":
        from qwen_serve.bench.suite import add_args as add_suite_args

        add_suite_args(bench_suite)

    bench_serve = sub.add_parser("bench-serve", help="load-test a running server (as vLLM's serving benchmark)")
    if command == "bench-serve":
        from qwen_serve.bench.serving import add_args as add_serving_args

        add_serving_args(bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    typed = shlex.join(["qwen-serve", *argv])
    if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCH_MODES:
        argv = [f"bench-{argv[1]}", *argv[2:]]
    command = argv[0] if argv and not argv[0].startswith("-") else None
    args = _build_parser(command).parse_args(argv)
    if args.command == "serve":
        from qwen_serve.server.launch import serve

        return serve(args)
    if args.command == "bench":
        from qwen_serve.bench.offline import run

        return int(run(args) or 0)
    if args.command == "bench-suite":
        from qwen_serve.bench.suite import run as run_suite

        return run_suite(args, typed)
    from qwen_serve.bench.serving import run as run_serving

    return run_serving(args)


if __name__ == "__main__":
    raise SystemExit(main())
