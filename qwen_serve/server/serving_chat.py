"""`POST /v1/chat/completions`: messages -> prompt (the model's own chat template) -> engine -> message.

The conversions are small pieces of their own so tool-call parsing can slot in without touching the
flow: `structured_output_of` (request -> engine constraint), `render_prompt` (messages -> prompt),
`output_to_message` (a finished sample -> message + finish reason) and, for streams, one
`MessageStream` per choice (text deltas -> delta messages, with state across deltas).
Streams follow OpenAI's order per choice: a role chunk, content deltas, a finish chunk; then a
usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from qwen_serve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.server.errors import APIError
from qwen_serve.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    NamedToolChoice,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
)
from qwen_serve.server.serving import (
    SSE_DONE,
    SSEResponse,
    first_output,
    Serving,
    finite,
    json_response,
    merge_streams,
    random_id,
    sse,
    sse_error,
    top_entries,
    until_disconnected,
    usage_of,
)
from qwen_serve.server.reasoning import ReasoningSplitter
from qwen_serve.server.tool_calls import StreamEvent, ToolCallParser, parse_tool_calls, tool_choice_spec


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts chat templates expect.

    Text parts are joined into one string; tool-call arguments sent as a JSON string become an object
    (Qwen's template serializes them itself); OpenAI's `developer` role is a system message here.
    """
    import json

    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if m.content is not None or m.role != "assistant":
            d["content"] = m.text()
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args: Any = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # keep the string: the template shows it as it came
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        out.append(d)
    return out


def render_prompt(tokenizer: Any, req: ChatCompletionRequest, protect: bool = True) -> str:
    """The prompt text for a chat request, by the model's template (ValueError for a bad conversation).
    protect: special tokens written in messages and tools become stand-ins that the tokenizer encodes as
    text (`Tokenizer.protect_special_tokens`), so they cannot forge turns."""
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    messages = message_dicts(req.messages)
    if protect:
        messages, tools = tokenizer.protect_special_tokens(messages), tokenizer.protect_special_tokens(tools)
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        **(req.chat_template_kwargs or {}),
    )


def structured_output_of(req: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    """The engine's `SamplingParams.structured_output` for this request and the field that asked for it
    (ValueError naming the field).

    tool_choice "required" or a named function is a grammar over Qwen's <tool_call> blocks; it takes
    precedence over response_format and vLLM's guided fields, which shape plain answers.
    """
    if parses_tool_calls(req):
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
        spec = tool_choice_spec([t.model_dump(exclude_none=True) for t in req.tools or []], choice,
                                req.parallel_tool_calls)
        if spec is not None:
            return spec, "tools"
    return req.structured_spec()


def parses_tool_calls(req: ChatCompletionRequest) -> bool:
    """Tools were offered to the model, so its <tool_call> blocks become `tool_calls`."""
    return bool(req.tools) and req.tool_choice != "none"


def _tool_names(req: ChatCompletionRequest) -> list[str]:
    return [t.function.name for t in req.tools or []]


def _finish_reason(output: CompletionOutput, has_calls: bool) -> str | None:
    # A turn that ends (not cut by max_tokens) with calls in it hands over to the tools.
    return "tool_calls" if has_calls and output.finish_reason == "stop" else output.finish_reason


def output_to_message(output: CompletionOutput, req: ChatCompletionRequest,
                      reasoning: ReasoningSplitter | None = None) -> tuple[ResponseMessage, str | None]:
    """The assistant message and finish reason of one finished sample; with a reasoning model's splitter,
    the thinking goes to reasoning_content and only the answer is read for tool calls."""
    text, thinking = output.text, None
    if reasoning is not None:
        reasoning.feed(text)
        reasoning.finish()
        text, thinking = reasoning.content, reasoning.reasoning
    if not parses_tool_calls(req):
        return ResponseMessage(content=text, reasoning_content=thinking), output.finish_reason
    parsed = parse_tool_calls(text or "", tool_names=_tool_names(req))
    content = parsed.content if text is not None else None
    message = ResponseMessage(content=content, reasoning_content=thinking,
                              tool_calls=[c.to_openai() for c in parsed.tool_calls])
    return message, _finish_reason(output, bool(parsed.tool_calls))


class MessageStream:
    """One streamed choice: turns the engine's text deltas into delta messages.

    Stateful on purpose (a parser may hold text back across deltas); `finish` flushes what is held
    and gives the finish reason. A reasoning model's thinking comes out as reasoning_content deltas; the
    answer goes on to the tool-call parser, if any.
    """

    def __init__(self, req: ChatCompletionRequest, reasoning: ReasoningSplitter | None = None) -> None:
        self.req = req
        self._reasoning = reasoning
        # The same parsers as output_to_message, fed delta by delta: streamed == non-streamed.
        self._tools = ToolCallParser(tool_names=_tool_names(req)) if parses_tool_calls(req) else None

    def feed(self, delta_text: str) -> list[DeltaMessage]:
        if self._reasoning is None:
            return self._answer(delta_text)
        thought, answer = self._reasoning.feed(delta_text)
        return self._thought(thought) + self._answer(answer)

    def finish(self, output: CompletionOutput) -> tuple[list[DeltaMessage], str | None]:
        tail: list[DeltaMessage] = []
        if self._reasoning is not None:
            thought, answer = self._reasoning.finish()
            tail = self._thought(thought) + self._answer(answer)
        if self._tools is None:
            return tail, output.finish_reason
        tail += _delta_messages(self._tools.finish())
        return tail, _finish_reason(output, bool(self._tools.result().tool_calls))

    @staticmethod
    def _thought(text: str) -> list[DeltaMessage]:
        return [DeltaMessage(reasoning_content=text)] if text else []

    def _answer(self, text: str) -> list[DeltaMessage]:
        if self._tools is None:
            return [DeltaMessage(content=text)] if text else []
        return _delta_messages(self._tools.feed(text))


def _delta_messages(events: list[StreamEvent]) -> list[DeltaMessage]:
    return [DeltaMessage(**e.to_openai()) for e in events]


def chat_logprobs(token_ids: list[int], positions: list[dict[int, Logprob]] | None, k: int) -> ChoiceLogprobs | None:
    if positions is None:
        return None
    content = []
    for tok, pos in zip(token_ids, positions):
        chosen = pos.get(tok)
        if chosen is None:  # the engine always includes the sampled token; guard anyway
            continue
        content.append(TokenLogprob(
            token=chosen.decoded_token, logprob=finite(chosen.logprob), bytes=list(chosen.decoded_token.encode()),
            top_logprobs=[TopLogprob(token=lp.decoded_token, logprob=finite(lp.logprob),
                                     bytes=list(lp.decoded_token.encode()))
                          for _, lp in top_entries(pos, k)],
        ))
    return ChoiceLogprobs(content=content)


@dataclass(slots=True)
class PreparedChat:
    """A validated chat request, rendered and tokenized, with the engine's parameters."""

    request: ChatCompletionRequest
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    top_k: int
    splitter: Callable[[], ReasoningSplitter | None]  # a fresh reasoning splitter per choice (None: no parser)


class ChatServing(Serving):
    async def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        """Checks, renders and tokenizes a chat request (APIError for what is wrong with it)."""
        try:
            req.validate_fields()
        except ValueError as err:
            raise APIError.from_value_error(err) from None
        model = self.check_model(req.model)
        self.check_ready()
        try:
            asked = structured_output_of(req)
        except ValueError as err:
            raise APIError.from_value_error(err) from None
        structured = await self.compile_structured(asked)
        try:
            prompt_text = render_prompt(self.tokenizer, req, protect=not self.settings.content_special_tokens)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        prompt_ids = await self.encode(prompt_text, "messages",
                                       literal_special_tokens=not self.settings.content_special_tokens)
        limit = req.output_limit if req.output_limit is not None else self.max_tokens_default()
        max_tokens = self.check_context(len(prompt_ids), limit)
        top_k = req.top_logprobs or 0
        tags = self.reasoning
        waits = tags is not None and structured is not None and tags.grammar_waits(prompt_ids)
        params = self.sampling_params(req, max_tokens=max_tokens, logprobs=top_k if req.logprobs else None,
                                      structured_output=structured, stream=bool(req.stream),
                                      reasoning_end_token_id=tags.end_id if waits else None)
        splitter = (lambda: tags.splitter(prompt_ids)) if tags is not None else (lambda: None)
        return PreparedChat(req, model, prompt_ids, params, top_k, splitter)

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        prep = await self.prepare(req)
        model, top_k, splitter = prep.model, prep.top_k, prep.splitter
        request_id = random_id("chatcmpl")
        merged = merge_streams([self.generate(prep.prompt_ids, prep.params, request_id)])
        first = await first_output(request, merged)
        first_out = first[1]
        if req.stream:
            return SSEResponse(self._stream(req, model, request_id, first_out, merged, top_k, splitter))
        final = await until_disconnected(request, self._collect(first_out, merged))
        return json_response(self._response(req, model, request_id, first_out, final, top_k, splitter))

    async def _collect(self, first: RequestOutput, rest: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, CompletionOutput]:
        final = {o.index: o for o in first.outputs}
        async for _, out in rest:
            for o in out.outputs:
                final[o.index] = o
        return final

    def _response(self, req: ChatCompletionRequest, model: str, request_id: str, first: RequestOutput,
                  final: dict[int, CompletionOutput], top_k: int,
                  splitter: Callable[[], ReasoningSplitter | None]) -> ChatCompletionResponse:
        choices = []
        for index in sorted(final):
            o = final[index]
            message, finish = output_to_message(o, req, splitter())
            choices.append(ChatChoice(
                index=index, message=message, finish_reason=finish, stop_reason=o.stop_reason,
                logprobs=chat_logprobs(o.token_ids, o.logprobs, top_k) if req.logprobs else None,
            ))
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices,
            usage=usage_of(final, len(first.prompt_token_ids), first.metrics.num_cached_tokens),
        )

    async def _stream(self, req: ChatCompletionRequest, model: str, request_id: str, first: RequestOutput,
                      rest: AsyncIterator[tuple[int, RequestOutput]], top_k: int,
                      splitter: Callable[[], ReasoningSplitter | None]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        exclude = None if include_usage else {"usage"}
        final: dict[int, CompletionOutput] = {}

        def chunk(choices: list[ChatStreamChoice], usage: Any = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                           usage=usage), exclude=exclude)

        for i in range(req.n):  # the role comes first, alone, for every choice
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        streams = {i: MessageStream(req, splitter()) for i in range(req.n)}
        finished: set[int] = set()
        out = first
        try:
            while True:
                for o in out.outputs:
                    final[o.index] = o
                    deltas = streams[o.index].feed(o.delta_text)
                    if req.logprobs and o.delta_token_ids:  # logprobs ride on the step's first delta
                        logprobs = chat_logprobs(o.delta_token_ids, o.delta_logprobs, top_k)
                        deltas = deltas or [DeltaMessage(content="")]
                    else:
                        logprobs = None
                    usage = (usage_of(final, len(out.prompt_token_ids), out.metrics.num_cached_tokens)
                             if continuous and deltas else None)
                    for k, delta in enumerate(deltas):
                        yield chunk([ChatStreamChoice(index=o.index, delta=delta,
                                                      logprobs=logprobs if k == 0 else None)], usage)
                    if o.finish_reason is not None and o.index not in finished:
                        finished.add(o.index)
                        tail, reason = streams[o.index].finish(o)
                        for delta in tail:
                            yield chunk([ChatStreamChoice(index=o.index, delta=delta)])
                        yield chunk([ChatStreamChoice(index=o.index, delta=DeltaMessage(), finish_reason=reason,
                                                      stop_reason=o.stop_reason)])
                nxt = await anext(rest, None)
                if nxt is None:
                    break
                out = nxt[1]
        except APIError as err:
            yield sse_error(err)
            yield SSE_DONE
            return
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
        if include_usage:
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                          usage=usage_of(final, len(first.prompt_token_ids),
                                                         first.metrics.num_cached_tokens)))
        yield SSE_DONE
