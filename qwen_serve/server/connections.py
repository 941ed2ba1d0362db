"""What a connection may hold: a time limit on its first request's headers, a limit on connections at once,
and logs that say a repeated error once per interval instead of once per attempt.

uvicorn has neither of the first two: its concurrency limit is checked when a request's headers are
complete, so connections that never finish them (slowloris) are held until the process runs out of file
descriptors, and asyncio then logs every failed accept (130 MB in 40 s, seen). `guarded_protocol` makes an
HTTP protocol class for uvicorn's `http=` setting that refuses a connection beyond the limit at once and
closes one whose first request's headers have not arrived in time; later requests on a kept-alive
connection are bounded by uvicorn's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("qwen_serve.server")

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s")
_BUSY_BODY = (b'{"error": {"message": "too many connections; retry later", "type": "server_error", '
              b'"param": null, "code": "too_many_connections"}}')


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refused a connection: %d open, the limit is %d (--max-connections)",
                            len(self.connections) - 1, max_connections)
                transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
                transport.close()
                return
            self._header_timer = asyncio.get_running_loop().call_later(header_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request has started
                log.info("closed a connection that sent no complete request in %g s (--header-timeout)",
                         header_timeout_s)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedHTTPProtocol


def raise_open_file_limit(wanted: int) -> int:
    """Raises this process's soft limit on open files towards `wanted` (within the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class RepeatFilter(logging.Filter):
    """Lets the same message (by its format string) through once per `interval_s`; the next one that
    passes says how many were held back."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[Any, list[float | int]] = {}  # msg -> [last time let through, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, record.levelno, str(record.msg))
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.msg} ({entry[1]} more like this in the last {self.interval_s:g} s)"
        self._seen[key] = [now, 0]
        if len(self._seen) > 1000:  # messages carrying varying text: keep the table small
            self._seen.clear()
        return True


def install_repeat_filter(interval_s: float = 10.0) -> None:
    """On the loggers that repeat themselves under a flood: asyncio's accept errors, uvicorn's, ours."""
    repeat = RepeatFilter(interval_s)
    for name in ("asyncio", "uvicorn.error", "qwen_serve.server"):
        logging.getLogger(name).addFilter(repeat)
