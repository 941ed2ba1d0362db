"""A real `qwen-serve serve` process on a free loopback port, for the server tests.

The server is started with `--port 0` and the test reads the port back from its ready line, so
parallel test sessions never race for a port. Output goes to a log file (a full pipe would block it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"qwen-serve ready in [\d.]+ s: API at (http://[^/\s]+)/v1")


class ServerProcess:
    def __init__(self, model: Path, log: Path, *extra: str, api_key: str | None = None) -> None:
        args = [sys.executable, "-m", "qwen_serve.cli", "serve", "--model", str(model), "--port", "0",
                "--device", "cpu", "--dtype", "float32", "--disable-uvicorn-access-log", *extra]
        if api_key:
            args += ["--api-key", api_key]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        env.pop("QWEN_SERVE_API_KEY", None)
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self.base_url = self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            m = READY.search(text)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log.read_text(errors='replace')[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def metrics(http: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics as 'name{label=value,...}' -> value, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(http: httpx.Client, timeout: float = 30.0) -> dict[str, float]:
    """Polls until no request runs or waits; returns the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["qwen_serve_num_requests_running"] == 0 and m["qwen_serve_num_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {m}")
        time.sleep(0.1)
