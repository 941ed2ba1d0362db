"""Server lifecycle on a real process: the waiting-queue limit (503 + Retry-After) and a graceful
SIGTERM that lets in-flight requests finish, refuses new connections and exits 0."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess, metrics


@pytest.mark.slow
def test_queue_limit_then_graceful_sigterm(tiny_chat_checkpoint: Path, tmp_path: Path):
    # One sequence at a time and at most one waiting: A runs, B waits, C is refused.
    server = ServerProcess(tiny_chat_checkpoint, tmp_path / "server.log", "--max-num-seqs", "1",
                           "--max-waiting", "1", "--num-kv-blocks", "512")
    try:
        http = httpx.Client(base_url=server.base_url, timeout=120)
        results: dict[str, object] = {}
        started = threading.Event()

        def stream_a() -> None:
            body = {"prompt": "A", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
            text, finish = "", None
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        finish = choice["finish_reason"] or finish
                        started.set()
                    elif line == "data: [DONE]":
                        results["a_done"] = True
            results["a"] = finish

        def request_b() -> None:
            r = httpx.post(f"{server.base_url}/v1/completions",
                           json={"prompt": "B", "max_tokens": 5, "ignore_eos": True}, timeout=120)
            results["b"] = (r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.text)

        a = threading.Thread(target=stream_a)
        a.start()
        assert started.wait(60), server.output()[-2000:]
        b = threading.Thread(target=request_b)
        b.start()
        deadline = time.monotonic() + 30
        while metrics(http)["qwen_serve_num_requests_waiting"] != 1:
            assert time.monotonic() < deadline, "B never queued"
            time.sleep(0.05)

        c = http.post("/v1/completions", json={"prompt": "C", "max_tokens": 5})
        assert c.status_code == 503, c.text
        assert c.headers["Retry-After"].isdigit()
        assert set(c.json()["error"]) == {"message", "type", "param", "code"}
        assert c.json()["error"]["code"] == "overloaded"
        assert http.get("/health").status_code == 200
        http.close()

        server.terminate()  # SIGTERM while A streams and B waits
        a.join(120)
        b.join(120)
        assert results.get("a") == "length" and results.get("a_done"), results
        assert results.get("b") == (200, 5), results
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/health", timeout=5)
    finally:
        server.stop()
