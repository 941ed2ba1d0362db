"""POST /v1/responses (OpenAI's Responses API) over the chat pipeline, and the store behind
`previous_response_id`.

A request becomes a chat request: `instructions` a system message, `input` (text, or items: messages,
function_call, function_call_output) the turns after the stored conversation of `previous_response_id`,
`text.format` the response_format, `tools` chat's tools. The answer's thinking (with --reasoning-parser),
text and tool calls become output items - reasoning, message, function_call - in the order they came. One
`OutputItems` builds them from the chat deltas for both the streamed events and the final object, so a
stream ends with the response a plain call returns.

Stored responses (`store`, true by default as in OpenAI's API) live in memory, the newest
`--max-stored-responses`; an evicted or unknown id is a 400 that says so. The stored conversation holds the
turns and answers, not `instructions`, which as in OpenAI's API apply to one request.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from qwen_serve.engine.outputs import CompletionOutput, RequestOutput
from qwen_serve.server.errors import APIError, error_body
from qwen_serve.server.protocol import ChatCompletionRequest, DeltaMessage, ResponsesRequest
from qwen_serve.server.serving import (
    SSEResponse,
    first_output,
    merge_streams,
    until_disconnected,
)
from qwen_serve.server.serving_chat import ChatServing, MessageStream, PreparedChat

TEXT_PART_TYPES = ("input_text", "output_text", "text")


class ResponseStore:
    """The newest `capacity` stored responses: id -> (the response object, its conversation as chat messages)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        if self.capacity == 0:
            return
        self._items[response["id"]] = (response, conversation)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        return self._items.get(response_id)

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        found = self.get(response_id)
        if found is None:
            raise APIError(400, f"previous response '{response_id}' is not stored: it was never made with store "
                           f"true, or was evicted (this server keeps the newest {self.capacity} in memory, none "
                           f"across restarts)", param="previous_response_id", code="previous_response_not_found")
        return found[1]


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.{j}: part type {kind!r} is not supported; qwen-serve reads text parts "
                             f"({', '.join(TEXT_PART_TYPES)})")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` as chat messages: a string is one user turn; function calls join the assistant turn they
    follow; reasoning items are not shown to the model again (its chat templates drop past thinking)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"input.{i}.role: must be user, system, developer or assistant, got {role!r}")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"input.{i}.content")})
        elif kind == "function_call":
            missing = [k for k in ("call_id", "name", "arguments") if not isinstance(item.get(k), str)]
            if missing:
                raise ValueError(f"input.{i}: a function_call item needs {', '.join(missing)} (strings)")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ValueError(f"input.{i}: a function_call_output item needs the call_id of its call")
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(output, f"input.{i}.output")})
        elif kind != "reasoning":
            raise ValueError(f"input.{i}: item type {kind!r} is not supported; qwen-serve reads message, "
                             f"function_call, function_call_output and reasoning items")
    return messages


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest,
                                                                                list[dict[str, Any]]]:
    """The chat request this Responses request asks for, and its conversation without instructions."""
    if req.background:
        raise APIError.bad_request("background: not supported; responses are made while the request waits",
                                   "background")
    if req.truncation != "disabled":
        raise APIError.bad_request("truncation: only 'disabled' is supported; a prompt over the context is "
                                   "refused", "truncation")
    try:
        turns = history + input_messages(req.input)
    except ValueError as err:
        raise APIError.from_value_error(err) from None
    if not turns:
        raise APIError.bad_request("input: must not be empty", "input")
    body: dict[str, Any] = {
        "model": req.model, "messages": ([{"role": "system", "content": req.instructions}] if req.instructions
                                         else []) + turns,
        "max_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p, "user": req.user,
    }
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
        choice = req.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise APIError.bad_request("tool_choice: must be none, auto, required or "
                                           "{\"type\": \"function\", \"name\": ...}", "tool_choice")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        body["tool_choice"] = choice
        body["parallel_tool_calls"] = req.parallel_tool_calls
    elif req.tool_choice not in ("auto", "none"):
        raise APIError.bad_request("tool_choice: needs tools", "tool_choice")
    if req.text is not None:
        body["response_format"] = req.text.format.response_format()
    try:
        return ChatCompletionRequest.model_validate(body), turns
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, str) or "[" not in p)
        raise APIError.bad_request(f"{where}: {first['msg']}" if where else first["msg"]) from None


class OutputItems:
    """Chat deltas -> the Responses output items (reasoning, message, function_call) and the stream events
    that build them; the item being streamed is closed when another kind of delta arrives or at the end."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None

    def add(self, delta: DeltaMessage) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta.reasoning_content:
            events += self._text("reasoning", delta.reasoning_content)
        if delta.content:
            events += self._text("message", delta.content)
        for call in delta.tool_calls or []:
            events += self._call(call)
        return events

    def close(self) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index, item["status"], events = len(self.items) - 1, "completed", []
        if item["type"] == "message":
            part = item["content"][0]
            events += [{"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "text": part["text"], "logprobs": []},
                       {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": part}]
        elif item["type"] == "reasoning":
            events.append({"type": "response.reasoning_text.done", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "text": item["content"][0]["text"]})
        else:
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "name": item["name"], "arguments": item["arguments"]})
        return events + [{"type": "response.output_item.done", "output_index": index, "item": item}]

    def _start(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.items.append(item)
        self._open = item
        index = len(self.items) - 1
        added = {**item, "content": []} if item["type"] == "message" else item
        events.append({"type": "response.output_item.added", "output_index": index, "item": _copy(added)})
        if item["type"] == "message":
            events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "part": _copy(item["content"][0])})
        return events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != kind:
            if kind == "message":
                item = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            else:
                item = {"id": _id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}]}
            events += self._start(item)
        item = self._open
        item["content"][0]["text"] += text
        index = len(self.items) - 1
        if kind == "message":
            events.append({"type": "response.output_text.delta", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "delta": text, "logprobs": []})
        else:
            events.append({"type": "response.reasoning_text.delta", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "delta": text})
        return events

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        function = call.get("function") or {}
        if call.get("id"):  # a new call starts
            events += self._start({"id": _id("fc"), "type": "function_call", "status": "in_progress",
                                   "call_id": call["id"], "name": function.get("name", ""), "arguments": ""})
        item = self._open
        arguments = function.get("arguments")
        if arguments and item is not None and item["type"] == "function_call":
            item["arguments"] += arguments
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": len(self.items) - 1, "delta": arguments})
        return events

    def assistant_message(self) -> dict[str, Any]:
        """The answer as a chat message, for the stored conversation."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        return {"role": "assistant", "content": text or (None if calls else ""), **({"tool_calls": calls} if calls else {})}


def _id(prefix: str) -> str:
    """OpenAI's form of Responses ids: resp_..., msg_..., fc_..., rs_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value))


class ResponsesServing(ChatServing):
    def __init__(self, *args: Any, store: ResponseStore, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    async def create(self, req: ResponsesRequest, request: Request) -> Response:  # type: ignore[override]
        history = self.store.conversation(req.previous_response_id) if req.previous_response_id else []
        chat, turns = chat_request(req, history)
        prep = await self.prepare(chat)
        response_id = _id("resp")
        merged = merge_streams([self.generate(prep.prompt_ids, prep.params, response_id)])
        shell = self._shell(req, prep, response_id)
        first = await first_output(request, merged)
        if req.stream:
            return SSEResponse(self._stream(req, prep, shell, turns, first[1], merged))
        final = await until_disconnected(request, self._collect(first[1], merged))
        items = OutputItems()
        stream = MessageStream(prep.request, prep.splitter())
        output = final[0]
        deltas = stream.feed(output.text)
        tail, _ = stream.finish(output)
        for delta in deltas + tail:
            items.add(delta)
        items.close()
        response = self._finish(req, shell, items, output, first[1], turns)
        return JSONResponse(response)

    def _shell(self, req: ResponsesRequest, prep: PreparedChat, response_id: str) -> dict[str, Any]:
        """The response object before its output: what the request asked for, echoed as OpenAI does."""
        return {
            "id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": prep.model, "output": [], "error": None, "incomplete_details": None,
            "instructions": req.instructions, "metadata": req.metadata or {},
            "previous_response_id": req.previous_response_id,
            "tools": [t.model_dump(by_alias=True) for t in req.tools or []], "tool_choice": req.tool_choice,
            "parallel_tool_calls": req.parallel_tool_calls, "temperature": prep.params.temperature,
            "top_p": prep.params.top_p, "max_output_tokens": req.max_output_tokens,
            "text": {"format": (req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text
                                else {"type": "text"})},
            "truncation": req.truncation, "store": req.store, "user": req.user, "usage": None,
        }

    def _finish(self, req: ResponsesRequest, shell: dict[str, Any], items: OutputItems, output: CompletionOutput,
                first: RequestOutput, turns: list[dict[str, Any]]) -> dict[str, Any]:
        cut = output.finish_reason == "length"
        prompt_tokens, generated = len(first.prompt_token_ids), len(output.token_ids)
        tags = self.reasoning
        reasoning_tokens = 0
        if tags is not None and any(i["type"] == "reasoning" for i in items.items):
            ids = list(output.token_ids)
            reasoning_tokens = ids.index(tags.end_id) + 1 if tags.end_id in ids else len(ids)
        response = {
            **shell, "output": items.items, "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {"input_tokens": prompt_tokens,
                      "input_tokens_details": {"cached_tokens": first.metrics.num_cached_tokens},
                      "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                      "total_tokens": prompt_tokens + generated},
        }
        if req.store:
            self.store.put(response, turns + [items.assistant_message()])
        return response

    async def _stream(self, req: ResponsesRequest, prep: PreparedChat, shell: dict[str, Any],
                      turns: list[dict[str, Any]], first: RequestOutput,
                      rest: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        number = 0

        def event(payload: dict[str, Any]) -> str:
            nonlocal number
            payload = {**payload, "sequence_number": number}
            number += 1
            return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        yield event({"type": "response.created", "response": shell})
        yield event({"type": "response.in_progress", "response": shell})
        items, stream, out = OutputItems(), MessageStream(prep.request, prep.splitter()), first
        try:
            while True:
                output = out.outputs[0]
                for delta in stream.feed(output.delta_text):
                    for e in items.add(delta):
                        yield event(e)
                if output.finish_reason is not None:
                    tail, _ = stream.finish(output)
                    for delta in tail:
                        for e in items.add(delta):
                            yield event(e)
                    for e in items.close():
                        yield event(e)
                    response = self._finish(req, shell, items, output, first, turns)
                    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
                    yield event({"type": kind, "response": response})
                    return
                nxt = await anext(rest, None)
                if nxt is None:
                    return
                out = nxt[1]
        except APIError as err:
            yield event({"type": "error", **error_body(err.message, err.type, err.param, err.code)["error"]})
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
