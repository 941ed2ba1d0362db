"""`qwen-serve serve`: flags, loading with progress, the ready line, and a graceful stop.

The HTTP socket opens first and the model loads in the engine thread, so `/health` answers 503
while loading. Once loaded, one line on stdout gives the URL of the API and of the chat page: the last
line of the start-up (uvicorn's own "running on" line, printed before the model is usable, is silenced).
SIGTERM or Ctrl-C: uvicorn stops accepting, waits for in-flight requests to finish, then the
engine thread stops and the process exits 0 (uvicorn would re-raise the signal; we do not).
A second Ctrl-C forces the exit. With `--nnodes` > 1, hosts other than 0 (`--node-rank`) only run
their tensor-parallel ranks, which host 0's engine drives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from qwen_serve.config import EngineConfig
from qwen_serve.engine.async_engine import AsyncEngine
from qwen_serve.server.connections import guarded_protocol, install_repeat_filter, raise_open_file_limit
from qwen_serve.server.reasoning import PARSERS as REASONING_PARSERS, ReasoningTags

API_KEY_ENV = "QWEN_SERVE_API_KEY"
RESPONSE_GRACE_S = 5.0  # after the graceful timeout, for the ended requests to write their error responses


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineConfig.add_cli_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use in requests (default: the --model argument)")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on the API (default: ${API_KEY_ENV} if set)")
    g.add_argument("--generation-config", default="auto",
                   help="sampling defaults: 'auto' (the model's generation_config.json), 'vllm' (none), or a folder")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="requests that may wait for the engine before new ones get 503 (default: 1024)")
    g.add_argument("--allowed-origins", type=_origins, default=[],
                   help="web origins whose pages may call the API, as a JSON list (vLLM's flag), e.g. "
                        "'[\"https://chat.example.com\"]' or '[\"*\"]' (default: the server's own page only)")
    g.add_argument("--content-special-tokens", action="store_true",
                   help="read special tokens written in chat message content (<|im_start|>...) as control tokens, "
                        "which lets a user forge turns; by default they are text, as in OpenAI's API")
    g.add_argument("--reasoning-parser", choices=tuple(REASONING_PARSERS), default=None,
                   help="a reasoning model's <think>...</think> becomes reasoning_content, and tool calls and JSON "
                        "output apply to the answer after it (vLLM's flag)")
    g.add_argument("--max-stored-responses", type=int, default=1000,
                   help="/v1/responses kept in memory for previous_response_id (default: the newest 1000)")
    g.add_argument("--max-prompts-per-request", type=int, default=256,
                   help="prompts one /v1/completions request may batch (default: 256)")
    g.add_argument("--max-request-body-mb", type=float, default=32.0, help="request body limit in MiB (default: 32)")
    g.add_argument("--timeout-graceful-shutdown", type=float, default=None,
                   help="seconds to let in-flight requests finish on shutdown (default: no limit)")
    g.add_argument("--max-connections", type=int, default=1000,
                   help="open connections at once; more are answered 503 and closed (default: 1000)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a new connection has to send its first request's headers (default: 10)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle kept-alive connection stays open (default: 5)")
    g.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")


def _origins(value: str) -> list[str]:
    try:
        origins = json.loads(value)
    except json.JSONDecodeError:
        origins = None
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise argparse.ArgumentTypeError(f"expected a JSON list of origins such as '[\"https://a.example\"]', got {value!r}")
    return origins


def _settings(args: argparse.Namespace):
    from qwen_serve.server.serving import ServerSettings

    return ServerSettings(
        served_model_names=args.served_model_name or [args.model],
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        generation_config=args.generation_config,
        max_body_bytes=int(args.max_request_body_mb * 1024 * 1024),
        max_prompts_per_request=args.max_prompts_per_request,
        allowed_origins=args.allowed_origins,
        content_special_tokens=args.content_special_tokens,
        reasoning_parser=args.reasoning_parser,
        max_stored_responses=args.max_stored_responses,
        model_root=args.model,
    )


def _loaded_check(settings: Any) -> Callable[[Any], None] | None:
    """What the server must check on the loaded model: the reasoning parser's tags in its tokenizer."""
    name = settings.reasoning_parser
    if name is None:
        return None

    def check(engine: Any) -> None:
        ReasoningTags.of(name, engine.tokenizer)

    return check


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1" if host != "::" else "[::1]"
    return f"[{host}]" if ":" in host else host


def serve(args: argparse.Namespace) -> int:
    from qwen_serve.server.app import build_app, webui_available

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        config = EngineConfig.from_cli_args(args)
        settings = _settings(args)
        engine = AsyncEngine(config, max_waiting=args.max_waiting, check_loaded=_loaded_check(settings))
        if args.max_connections < 1 or args.header_timeout <= 0 or args.timeout_keep_alive <= 0:
            raise ValueError("--max-connections must be at least 1, --header-timeout and --timeout-keep-alive positive")
        if args.generation_config not in ("auto", "vllm") and not os.path.isdir(args.generation_config):
            raise ValueError(f"--generation-config: {args.generation_config!r} is not 'auto', 'vllm' or a folder")
    except ValueError as err:
        print(f"qwen-serve: {err}", file=sys.stderr)
        return 2
    if config.node_rank > 0:  # another host of a multi-host group: its ranks only; host 0 serves the API
        from qwen_serve.engine.executor import run_node_workers

        print(f"qwen-serve: host {config.node_rank} of {config.nnodes}: running its tensor-parallel ranks",
              file=sys.stderr, flush=True)
        return run_node_workers(config)
    app = build_app(engine, settings)
    grace = args.timeout_graceful_shutdown
    raise_open_file_limit(args.max_connections + 256)  # room for the connections, the model's files, logs
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log, lifespan="on",
        http=guarded_protocol(args.max_connections, args.header_timeout), timeout_keep_alive=args.timeout_keep_alive,
        # uvicorn cuts connections mid-response at its timeout; ours ends the requests first (_Server.shutdown)
        timeout_graceful_shutdown=None if grace is None else grace + RESPONSE_GRACE_S,
    )
    install_repeat_filter()  # after uvicorn.Config, which sets its loggers up
    server = _Server(uv_config, engine, has_page=webui_available(), model=args.model, graceful_s=grace)
    try:
        server.run()
    except OSError as err:  # e.g. the port is taken
        print(f"qwen-serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    if engine.load_error is not None or engine.fatal_error is not None:
        return 1
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn.Server plus the loading / ready announcements and an exit status of 0 after a signal."""

    def __init__(self, config: uvicorn.Config, engine: "AsyncEngine", *, has_page: bool, model: str,
                 graceful_s: float | None = None) -> None:
        super().__init__(config)
        self.engine = engine
        self.graceful_s = graceful_s
        self.has_page = has_page
        self.model = model
        self._announcer: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its graceful shutdown, which would end the process with
        # a non-zero status; a clean stop on SIGTERM / Ctrl-C exits 0.
        self._captured_signals.clear()

    def _log_started_message(self, listeners: Any) -> None:
        """Silences uvicorn's "Uvicorn running on http://..." line: it comes before the model is loaded,
        and a user reading it would send requests that get 503. The ready line gives the URL instead."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """After --timeout-graceful-shutdown, the requests still running end with an error in OpenAI's
        shape (a stream's last event, a 503 body), rather than being cut off by uvicorn's own timeout."""
        timer = None
        if self.graceful_s is not None:
            reason = f"the server is shutting down (--timeout-graceful-shutdown {self.graceful_s:g} s passed)"
            timer = asyncio.get_running_loop().call_later(self.graceful_s, self.engine.fail_in_flight, reason)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._announcer = asyncio.create_task(self._announce())

    async def _announce(self) -> None:
        start = time.monotonic()
        engine = self.engine
        print(f"qwen-serve: loading model {self.model!r} ...", file=sys.stderr, flush=True)
        tty = sys.stderr.isatty()
        last = 0.0
        while engine.is_loading and not self.should_exit:
            await asyncio.sleep(0.25)
            elapsed = time.monotonic() - start
            if tty:
                print(f"\rqwen-serve: loading ... {elapsed:5.1f} s", end="", file=sys.stderr, flush=True)
            elif elapsed - last >= 10:
                last = elapsed
                print(f"qwen-serve: still loading ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        if tty:
            print(file=sys.stderr)
        if engine.load_error is not None:
            print(f"qwen-serve: loading failed: {engine.load_error}", file=sys.stderr, flush=True)
            self.should_exit = True
            return
        if self.should_exit:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        base = f"http://{_url_host(str(host))}:{port}"
        page = f", chat page at {base}/" if self.has_page else ""
        print(f"qwen-serve ready in {time.monotonic() - start:.1f} s: API at {base}/v1{page}", flush=True)
        while not self.should_exit:  # a failure that ends serving (worker processes gone) ends the process
            await asyncio.sleep(0.5)
            if engine.fatal_error is not None:
                print(f"qwen-serve: stopping: {engine.fatal_error}", file=sys.stderr, flush=True)
                self.should_exit = True
