"""Which Triton kernels compiled while a piece of work ran, and for how long.

A Triton kernel compiles a variant for every new combination of its compile-time constants and
specialized arguments, on the first launch that needs it: seconds each, on the launching thread. The
runner compiles every variant a server meets before it serves (ModelRunner's eager warm-up and graph
capture); the benchmark wraps each of its sections in `triton_compiles` so that any compile left on
the request path shows in its JSON instead of hiding in a slower figure.

It listens through Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook`, called before a kernel
that is not in the process's in-memory cache is compiled or loaded from Triton's on-disk cache, and
`jit_post_compile_hook`, called once it is ready), so a load from the disk cache counts too, with its
(short) time. The time leaves out the launcher stub and module load that follow at the first launch.
Without Triton (CPU-only installs) nothing is recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CompileRecord:
    kernel: str
    seconds: float


@dataclass(slots=True)
class CompileLog:
    """The compiles seen inside one `triton_compiles` block; `available` is False without Triton."""

    available: bool
    records: list[CompileRecord] = field(default_factory=list)
    _started: dict[tuple[str, str], float] = field(default_factory=dict)

    def started(self, kernel: str, key: str) -> None:
        self._started[kernel, key] = time.perf_counter()

    def finished(self, kernel: str, key: str) -> None:
        start = self._started.pop((kernel, key), None)
        self.records.append(CompileRecord(kernel, 0.0 if start is None else time.perf_counter() - start))

    def as_json(self) -> dict[str, Any] | None:
        if not self.available:
            return None
        kernels: dict[str, int] = {}
        for r in self.records:
            kernels[r.kernel] = kernels.get(r.kernel, 0) + 1
        return {"count": len(self.records), "seconds": round(sum(r.seconds for r in self.records), 3),
                "kernels": kernels}


def _runtime_knobs():
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs.runtime


@contextlib.contextmanager
def triton_compiles() -> Iterator[CompileLog]:
    """Records the Triton compiles (and disk-cache loads) of the block; hooks set before are kept and called."""
    runtime = _runtime_knobs()
    log = CompileLog(available=runtime is not None)
    if runtime is None:
        yield log
        return
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def on_cache_miss(*, key, fn, **kwargs):
        log.started(fn.name, str(key))
        # A hook that returns True tells Triton to skip the compile: pass on whatever the previous one says.
        return before(key=key, fn=fn, **kwargs) if before is not None else None

    def on_compiled(*, key, fn, **kwargs):
        log.finished(fn.name, str(key))
        return after(key=key, fn=fn, **kwargs) if after is not None else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_cache_miss, on_compiled
    try:
        yield log
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
