"""`AsyncEngine`: the asyncio front of `LLMEngine`, with the engine loop in a thread of its own.

Thread boundary (vLLM's async_llm.py split, without the extra process):
- the event loop never calls `LLMEngine`: it puts small command tuples on a `queue.Queue`
  (add / abort / stop) and returns at once;
- the engine thread owns the `LLMEngine`: it drains commands, runs `step()`, and hands each
  step's outputs back with one `loop.call_soon_threadsafe` per step, which puts every
  `RequestOutput` on the asyncio queue of its request.
So a long step never blocks HTTP handling and a slow client never blocks a step. When the engine has
no work the thread sleeps on the command queue. A request whose consumer goes away (client
disconnect, task cancelled, generator closed) is aborted, which frees its KV blocks.

The model loads in the engine thread too, so the HTTP server can answer `/health` with 503 while
a large checkpoint is being read.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_serve.config import EngineConfig
from qwen_serve.engine.outputs import EngineStats, RequestOutput
from qwen_serve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from qwen_serve.engine.llm_engine import LLMEngine

logger = logging.getLogger("qwen_serve.engine")


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the queue limit allows; the client should retry later."""


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine is shutting down."""


class EngineDeadError(RuntimeError):
    """`step()` raised: the requests in flight were failed with this error."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


_Item = RequestOutput | BaseException


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        engine: "LLMEngine | None" = None,
        max_waiting: int | None = None,
        check_loaded: Callable[["LLMEngine"], None] | None = None,
    ) -> None:
        """`check_loaded`: run on the loaded engine before it serves (a server option that needs the model,
        such as its tokenizer's tokens); its ValueError fails the load like a bad checkpoint."""
        if config is None and engine is None:
            raise ValueError("AsyncEngine needs an EngineConfig to load from or a ready LLMEngine")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"--max-waiting must be >= 0, got {max_waiting}")
        self.config = config
        self.max_waiting = max_waiting
        self._check_loaded = check_loaded
        self._engine = engine
        self._commands: queue.Queue[_Add | _Abort | _Stop] = queue.Queue()
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        # Requests accepted but without any output yet: what the waiting-queue limit counts.
        self._not_started: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = False
        self.load_error: BaseException | None = None
        # The model's worker processes failed: nothing more can be served (the launcher exits non-zero).
        self.fatal_error: BaseException | None = None
        self._stats: EngineStats | None = None
        # Request ids the engine holds; touched by the engine thread only (the event loop has its own view).
        self._live: set[str] = set()

    # ------------------------------------------------------------ lifecycle (event-loop side)

    def start(self) -> None:
        """Starts the engine thread (which loads the model first when needed). Call from the event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="qwen-serve-engine", daemon=True)
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None and not self._stopping

    @property
    def is_loading(self) -> bool:
        """Not ready yet (loading, or not started) and not failed or stopping."""
        return not self._ready.is_set() and self.load_error is None and not self._stopping

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Returns once the model is loaded; raises the load error if loading failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.is_set() and self.load_error is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("model did not finish loading in time")
            await asyncio.sleep(0.05)
        if self.load_error is not None:
            raise self.load_error

    async def shutdown(self) -> None:
        """Fails what is still in flight, stops the engine thread and waits for it."""
        self._stopping = True
        if self._thread is None or not self._ready.is_set():
            return  # still loading: the daemon thread dies with the process
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ------------------------------------------------------------ engine facts

    @property
    def engine(self) -> "LLMEngine":
        if self._engine is None or not self._ready.is_set():
            raise EngineNotReady("the model is still loading")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def default_sampling_params(self) -> dict[str, Any]:
        return self.engine.default_sampling_params()

    def stats(self) -> EngineStats | None:
        """The snapshot taken after the engine's latest step (None until the model is loaded)."""
        return self._stats

    @property
    def num_waiting(self) -> int:
        return len(self._not_started)

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ------------------------------------------------------------ requests

    def check_capacity(self, needed: int = 1) -> None:
        """Raises EngineOverloaded when the waiting queue has no room for `needed` more requests (call
        before doing any work)."""
        if not self.is_ready:
            if self.fatal_error is not None:
                raise EngineNotReady(f"the engine stopped: {self.fatal_error}")
            raise EngineNotReady("the model is still loading" if not self._stopping else "the server is shutting down")
        if self.max_waiting is not None and len(self._not_started) + needed > self.max_waiting:
            asked = f"; this one would add {needed}" if needed > 1 else ""
            raise EngineOverloaded(f"{len(self._not_started)} requests are waiting (limit {self.max_waiting}){asked}")

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (each with this step's deltas) until the finished one.

        Raises the engine's ValueError for a request it refuses (too long, bad params), and aborts
        the request when the consumer stops early, whatever the reason.
        """
        self.check_capacity()
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        q: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[request_id] = q
        self._not_started.add(request_id)
        self._commands.put(_Add(request_id, prompt, params, time.time()))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                self._not_started.discard(request_id)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self._not_started.discard(request_id)
            if not finished:
                self._commands.put(_Abort(request_id))

    def fail_in_flight(self, reason: str) -> None:
        """Ends every request in flight with EngineNotReady(reason) (a stream gets it as its last event,
        a waiting response as a 503) and aborts them in the engine. Call from the event loop."""
        for request_id in list(self._queues):
            self._commands.put(_Abort(request_id))
        self._fail_all(EngineNotReady(reason))

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            if self._engine is None:
                from qwen_serve.engine.llm_engine import LLMEngine

                self._engine = LLMEngine.from_config(self.config)  # type: ignore[arg-type]
            if self._check_loaded is not None:
                try:
                    self._check_loaded(self._engine)
                except ValueError:
                    self._engine.close()
                    raise
            self._stats = self._engine.stats()
        except (ValueError, OSError) as err:  # a bad path, config or checkpoint: the message says it all
            self.load_error = err
            self._ready.set()
            return
        except BaseException as err:  # noqa: BLE001 - reported to the launcher, which exits non-zero
            logger.exception("loading the model failed")
            self.load_error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop_forever(self._engine)
        except BaseException:  # noqa: BLE001 - the loop itself broke: fail every waiter rather than hang them
            logger.exception("engine loop crashed")
            self._stopping = True
            self._call_soon(self._fail_all, EngineDeadError("the engine loop stopped"))
        finally:
            if self.config is not None:  # an engine this object built: stop its worker processes too
                self._engine.close()

    def _loop_forever(self, engine: "LLMEngine") -> None:
        from qwen_serve.engine.executor import ExecutorDeadError  # the engine module has imported it already

        stop = False
        while True:
            idle = not engine.has_unfinished_requests()
            if stop and idle:
                return
            # Sleep on the command queue only when there is nothing to step.
            commands = self._drain(block=idle and not stop)
            for cmd in commands:
                if isinstance(cmd, _Stop):
                    stop = True
                    self._abort_everything(engine)
                    self._call_soon(self._fail_all, EngineNotReady("the server is shutting down"))
                else:
                    self._apply(engine, cmd)
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except ExecutorDeadError as err:  # the model is gone: refuse everything from now on
                    logger.error("the model's worker processes failed: %s", err)
                    self.fatal_error = err
                    self._stopping = True
                    self._abort_everything(engine)
                    self._call_soon(self._fail_all, EngineNotReady(f"the engine stopped: {err}"))
                    return
                except Exception as err:  # noqa: BLE001 - one bad step must not take the server down
                    logger.exception("engine step failed; failing the requests in flight")
                    self._abort_everything(engine)
                    self._call_soon(self._fail_all, EngineDeadError(f"engine step failed: {err}"))
                    outputs = []
                if outputs:
                    self._live.difference_update(o.request_id for o in outputs if o.finished)
                    self._call_soon(self._deliver, outputs)
            self._stats = engine.stats()

    def _drain(self, block: bool) -> list[_Add | _Abort | _Stop]:
        out: list[_Add | _Abort | _Stop] = []
        try:
            # The timeout only bounds how stale the stats snapshot can get while idle.
            out.append(self._commands.get(timeout=0.5) if block else self._commands.get_nowait())
            while True:
                out.append(self._commands.get_nowait())
        except queue.Empty:
            return out

    def _apply(self, engine: "LLMEngine", cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            self._live.discard(cmd.request_id)
            try:
                engine.abort_request(cmd.request_id)
            except Exception:  # noqa: BLE001 - it may have finished meanwhile; nothing to free then
                logger.debug("abort of %s: nothing to abort", cmd.request_id, exc_info=True)
            return
        try:
            engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time)
            self._live.add(cmd.request_id)
        except ValueError as err:
            self._call_soon(self._fail, cmd.request_id, err)
        except Exception as err:  # noqa: BLE001 - a bug for this request only; report it as such
            logger.exception("add_request failed for %s", cmd.request_id)
            self._call_soon(self._fail, cmd.request_id, EngineDeadError(f"could not add the request: {err}"))

    def _abort_everything(self, engine: "LLMEngine") -> None:
        live, self._live = self._live, set()
        for rid in live:
            try:
                engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort after a failed step
                logger.exception("abort of %s failed", rid)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------------ event-loop callbacks

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:  # None: the consumer left and its abort is on the way
                q.put_nowait(out)

    def _fail(self, request_id: str, err: BaseException) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(err)

    def _fail_all(self, err: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(err)
