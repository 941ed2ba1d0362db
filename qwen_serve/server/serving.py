"""What chat and completions serving share: settings, model-name check, tokenizing, the context-length
check, request -> SamplingParams, running engine requests with metrics, merging several requests'
streams, SSE framing, and aborting on client disconnect.

Everything here runs on the event loop; the only calls into the engine go through `AsyncEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from qwen_serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineNotReady, EngineOverloaded
from qwen_serve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from qwen_serve.engine.sampling_params import RequestOutputKind, SamplingParams, defaults_from_generation_config
from qwen_serve.server.errors import APIError, ClientDisconnected, error_body
from qwen_serve.server.metrics import ServerMetrics
from qwen_serve.server.protocol import PromptTokensDetails, UsageInfo, SamplingFields
from qwen_serve.server.reasoning import ReasoningTags, check_parser_name
from qwen_serve.structured import StructuredOutputError, precompile

T = TypeVar("T")

# Prompts longer than this are tokenized in a worker thread so they cannot stall the event loop.
_THREAD_TOKENIZE_CHARS = 8192


@dataclass(slots=True)
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    # "auto": the model's generation_config.json; "vllm": none (plain defaults); else a folder to read it from.
    generation_config: str = "auto"
    max_body_bytes: int = 32 * 1024 * 1024
    max_prompts_per_request: int = 256
    # Web origins (scheme://host:port) whose pages may call the API besides the server's own; "*": any.
    allowed_origins: list[str] = field(default_factory=list)
    # Special tokens written in message content are control tokens (True) or their text (False, OpenAI's way).
    content_special_tokens: bool = False
    # vLLM's --reasoning-parser: <think>...</think> becomes reasoning_content (server/reasoning.py).
    reasoning_parser: str | None = None
    # /v1/responses kept in memory for previous_response_id and retrieval: the newest this many.
    max_stored_responses: int = 1000
    retry_after_s: int = 1
    model_root: str | None = None

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("--served-model-name: at least one name is needed")
        if self.max_prompts_per_request < 1:
            raise ValueError(f"--max-prompts-per-request must be at least 1, got {self.max_prompts_per_request}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"the request body limit must be at least 1 KiB, got {self.max_body_bytes} bytes")
        check_parser_name(self.reasoning_parser)
        if self.max_stored_responses < 0:
            raise ValueError(f"--max-stored-responses must be >= 0, got {self.max_stored_responses}")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    """Base of the chat and completions handlers."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._defaults: dict[str, Any] | None = None
        self._reasoning: ReasoningTags | None = None

    @property
    def reasoning(self) -> ReasoningTags | None:
        """The --reasoning-parser's tags in this model's tokenizer (checked when the model loaded)."""
        if self._reasoning is None and self.settings.reasoning_parser is not None:
            self._reasoning = ReasoningTags.of(self.settings.reasoning_parser, self.tokenizer)
        return self._reasoning

    # ------------------------------------------------------------ checks

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.settings.served_model_names[0]
        if name not in self.settings.served_model_names:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.settings.served_model_names)}",
                           param="model", code="model_not_found")
        return name

    def check_ready(self, needed: int = 1) -> None:
        """503 while loading or shutting down, 503 + Retry-After when the waiting queue has no room for
        `needed` more requests (all of a batch's prompts are admitted, or none)."""
        try:
            self.engine.check_capacity(needed)
        except EngineOverloaded as err:
            raise APIError(503, f"server overloaded: {err}; retry later", code="overloaded",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineNotReady as err:
            raise APIError(503, str(err), code="not_ready",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None

    @property
    def tokenizer(self) -> Any:
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError.bad_request("this model has no tokenizer: send token-id prompts to /v1/completions")
        return tok

    async def compile_structured(self, asked: tuple[dict[str, Any], str] | None) -> dict[str, Any] | None:
        """The request's structured-output spec (from `SamplingFields.structured_spec`: spec and the field
        that asked), compiled on the grammar pool rather than the engine thread: a bad spec is a 400 here
        naming that field, and the engine's new_constraint finds it cached (same spec, tokenizer and
        vocab size). None for free text."""
        if asked is None:
            return None
        spec, param = asked
        try:
            await asyncio.wrap_future(precompile(spec, self.tokenizer, self.vocab_limit()))
        except StructuredOutputError as err:
            raise APIError(400, str(err), param=param) from None
        return spec

    def vocab_limit(self) -> int:
        """Token ids the model accepts (its embedding rows; can exceed the tokenizer's vocabulary)."""
        return self.engine.engine.model_config.vocab_size

    def check_token_ids(self, ids: list[int], param: str) -> None:
        limit = self.vocab_limit()
        for t in ids:
            if not 0 <= t < limit:
                raise APIError.bad_request(f"{param}: token id {t} is outside the vocabulary [0, {limit})", param)

    def check_context(self, prompt_len: int, max_tokens: int | None) -> int:
        """Returns max_tokens (filled in when None); 400 context_length_exceeded when it cannot fit."""
        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise APIError.bad_request("the prompt is empty", "prompt")
        if max_tokens is None:
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit or max_tokens < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, {max(max_tokens, 1)} for "
                "the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if prompt_len < limit else "messages",
                code="context_length_exceeded",
            )
        return max_tokens

    # ------------------------------------------------------------ prompts and params

    async def encode(self, text: str, param: str, limit: int | None = None, **kw: Any) -> list[int]:
        """Token ids of a prompt, off the event loop when long (the tokenizer then releases the GIL). A text
        too long to fit `limit` tokens (default: the context) whatever it says is refused before tokenizing;
        text that is not valid Unicode is a 400 naming `param`."""
        tok = self.tokenizer
        limit = self.engine.max_model_len if limit is None else limit
        field = param.split(".")[0]  # prompt.1 (the second of several prompts) is the field prompt
        if len(text) > tok.max_chars(limit):
            raise APIError(400, f"{param}: {len(text):,} characters cannot fit in {limit:,} tokens (this model's "
                           f"tokens stand for at most {tok.max_token_chars} characters each)", param=field,
                           code="context_length_exceeded")
        try:
            if len(text) > _THREAD_TOKENIZE_CHARS:
                return await asyncio.to_thread(tok.encode, text, **kw)
            return tok.encode(text, **kw)
        except ValueError as err:
            raise APIError.bad_request(f"{param}: {err}", field) from None

    def defaults(self) -> dict[str, Any]:
        """SamplingParams defaults by --generation-config (computed once the model is loaded)."""
        if self._defaults is None:
            mode = self.settings.generation_config
            if mode == "auto":
                self._defaults = dict(self.engine.default_sampling_params())
            elif mode == "vllm":
                self._defaults = {}
            else:
                from qwen_serve.loader.model_loader import load_generation_config

                self._defaults = defaults_from_generation_config(load_generation_config(mode))
        return self._defaults

    def sampling_params(self, req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                        structured_output: dict[str, Any] | None = None,
                        prompt_logprobs: int | None = None, stream: bool = True,
                        reasoning_end_token_id: int | None = None) -> SamplingParams:
        """Request fields over --generation-config defaults; every field is set explicitly, so the
        engine applies no defaults of its own on top. A request that is not streamed asks the engine
        for its final output only: under load, an output per request per step (built, then passed to
        the event loop) is host work the engine thread and the server share."""
        fields: dict[str, Any] = dict(self.defaults())
        fields.pop("max_tokens", None)  # already resolved by the caller against the context length
        given = {
            "n": req.n, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "min_p": req.min_p, "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty, "repetition_penalty": req.repetition_penalty,
            "seed": req.seed, "stop": req.stop, "stop_token_ids": req.stop_token_ids, "logit_bias": req.token_bias(),
            "allowed_token_ids": req.allowed_token_ids,
        }
        fields.update({k: v for k, v in given.items() if v is not None})
        fields.update(
            max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            structured_output=structured_output, prompt_logprobs=prompt_logprobs,
            reasoning_end_token_id=reasoning_end_token_id,
            output_kind=RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY,
        )
        try:
            return SamplingParams(**fields).validate()
        except ValueError as err:
            raise APIError.from_value_error(err) from None

    def max_tokens_default(self) -> int | None:
        value = self.defaults().get("max_tokens")
        return int(value) if value is not None else None

    # ------------------------------------------------------------ running requests

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, with metrics; engine refusals become 400s."""
        start = time.perf_counter()
        ttft: float | None = None
        last: RequestOutput | None = None
        refused = False
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                if ttft is None and out.metrics.first_token_time is not None and any(o.token_ids for o in out.outputs):
                    # The engine's clock, from the request's arrival: a final-only output comes at the end.
                    ttft = out.metrics.first_token_time - out.metrics.arrival_time
                last = out
                yield out
        except ValueError as err:
            refused = last is None
            raise APIError.from_value_error(err) from None
        except EngineOverloaded as err:
            refused = True
            raise APIError(503, f"server overloaded: {err}", code="overloaded",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineNotReady as err:
            refused = last is None
            raise APIError(503, str(err), code="not_ready") from None
        except EngineDeadError as err:
            raise APIError(500, str(err), code="engine_error") from None
        finally:
            if not refused:
                outs = last.outputs if last is not None else []
                reasons = [o.finish_reason or "abort" for o in outs] or ["abort"] * params.n
                self.metrics.observe_finished(
                    finish_reasons=reasons,
                    prompt_tokens=len(prompt),
                    generation_tokens=sum(len(o.token_ids) for o in outs),
                    ttft=ttft,
                    e2e=time.perf_counter() - start,
                )



def usage_of(final: dict[int, CompletionOutput], prompt_tokens: int, cached_tokens: int) -> UsageInfo:
    completion = sum(len(o.token_ids) for o in final.values())
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def finite(logprob: float) -> float:
    """JSON has no -inf / NaN: masked-out tokens report -9999.0 (as vLLM does)."""
    return logprob if math.isfinite(logprob) else -9999.0


def top_entries(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens at one position, best first."""
    return sorted(((t, lp) for t, lp in position.items() if lp.rank <= k), key=lambda kv: kv[1].rank)[:k]


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    Closing (or cancelling) the merged stream closes every source, so their requests get aborted.
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    done = object()
    q: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, source: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(source) as s:  # type: ignore[type-var]
                async for item in s:
                    q.put_nowait((i, item, None))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put_nowait((i, None, err))
        finally:
            q.put_nowait((i, done, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err = await q.get()
            if err is not None:
                raise err
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    watcher.cancel()
    if not task.done():  # the watcher returned first: the client is gone
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


async def first_output(request: Request, merged: AsyncIterator[T]) -> T:
    """The first item of a request's merged engine streams (ClientDisconnected if the client left first)."""
    try:
        return await until_disconnected(request, anext(merged))
    except StopAsyncIteration:
        raise APIError(500, "the engine returned no output") from None


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that closes its generator however the response ends, so a
    client disconnect aborts the engine requests at once rather than whenever GC finalizes them."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._source = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._source.aclose()  # type: ignore[attr-defined]


def sse_error(err: APIError) -> str:
    return f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
