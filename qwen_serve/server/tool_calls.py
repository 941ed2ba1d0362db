"""Qwen tool calls: `<tool_call>` blocks in the model's text -> OpenAI `tool_calls`, streamed or not, and the
grammars that force calls for `tool_choice` "required" or a named function.

Qwen2.5 answers a tool request with one or more blocks (MODELS.md):
    <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>
One parser serves both paths: `parse_tool_calls(text)` runs `ToolCallParser` over the whole text at once,
and the streaming path feeds it the detokenizer's deltas, so streamed and non-streamed results are equal
by construction (the tests check this over random chunk splits).

Rules (the same whatever the chunking):
* Content is the text outside blocks; whitespace touching a block is dropped (the "\\n" Qwen puts between
  blocks is not content). With tool calls and no other text, content is None (OpenAI's null).
* A block whose text starts `{"name": "<n>", "arguments":` (Qwen's own order) streams as it is generated:
  one delta with id + name, then argument fragments. `function.arguments` is the model's argument text
  verbatim (the JSON value, without the closing brace of the outer object).
* Any other block is read when it closes: a JSON object with a string "name" (and "arguments" or
  "parameters") is a call whose arguments are re-serialized; anything else is not a call and is kept as
  content verbatim, tags and surrounding whitespace included, so no model output is silently lost. With tool_choice "required" or a
  named function the grammar makes every block well-formed, so this only happens under "auto".
* A block cut off by the end of the output (max_tokens) still ends its call with the text generated so far.
* Text that may be the start of `<tool_call>` is held back until it is known not to be.
* Bare calls (only when the caller passes the declared tool names): small Qwen models often answer a tool
  request with the call as plain JSON, `{"name": ..., "arguments": {...}}` (or a list of them), bare or in
  one ```json fence, without the tags (Qwen2.5-Coder-0.5B does, under tool_choice "auto"). An answer that is
  exactly that, with every name a declared tool and no other keys, is read as calls. While an answer could
  still be one (it starts with `{`, `[` or ```json) nothing is streamed; it goes out whole at the end.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from qwen_serve.structured.spec import JSON_FORMAT

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# Qwen's own key order: the name is known (and streamed) before any argument text arrives.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')
# The end of the argument text that may still turn out to be the outer object's closing brace.
_ARGS_TAIL = re.compile(r"\s*\}?\s*$")


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str

    def to_openai(self) -> dict[str, Any]:
        return {"content": self.text}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """The first delta of a call carries id and name; later ones only argument fragments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        call: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            call.update(id=self.id, type="function")
            function = {"name": self.name, "arguments": self.arguments}
        call["function"] = function
        return {"tool_calls": [call]}


StreamEvent = ContentDelta | ToolCallDelta


def parse_tool_calls(text: str, make_id: Callable[[], str] = new_call_id,
                     tool_names: Collection[str] | None = None) -> ParsedMessage:
    """Split a complete answer into content and tool calls (bare JSON calls too when tool_names is given)."""
    parser = ToolCallParser(make_id, tool_names)
    parser.feed(text)
    parser.finish()
    return parser.result()


class ToolCallParser:
    """Incremental parser: `feed(delta)` / `finish()` return OpenAI delta events; `result()` the whole message."""

    def __init__(self, make_id: Callable[[], str] = new_call_id, tool_names: Collection[str] | None = None) -> None:
        self._make_id = make_id
        self._tool_names = frozenset(tool_names or ())
        self._maybe_bare = tool_names is not None  # the whole answer may yet be a bare JSON call: hold it all
        self._pending = ""        # text not yet emitted: outside text held back, or the open block's body
        self._in_block = False
        self._after_block = False  # drop whitespace right after a call
        self._ws_before = ""      # whitespace dropped before the open block (restored if it is not a call)
        self._header_end = -1     # in a block: end of the streamed header in _pending, -1 until seen
        self._args_sent = 0       # characters of the current call's arguments already emitted
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._call_id = ""
        self._call_name = ""

    # -- public -----------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[StreamEvent]:
        self._pending += delta
        events: list[StreamEvent] = []
        if self._maybe_bare:
            if TOOL_CALL_START not in self._pending and _could_be_bare(self._pending):
                return events
            self._maybe_bare = False
        while True:
            progressed = self._step_block(events, final=False) if self._in_block else self._step_outside(events, final=False)
            if not progressed:
                return events

    def finish(self) -> list[StreamEvent]:
        """End of output: flush held-back text and close a block the output ended inside."""
        events: list[StreamEvent] = []
        if self._maybe_bare:
            self._maybe_bare = False
            calls = _bare_calls(self._pending, self._tool_names, self._make_id)
            if calls:
                for call in calls:
                    events.append(ToolCallDelta(len(self._calls), call.arguments, call.id, call.name))
                    self._calls.append(call)
                self._pending = ""
                return events
        if self._in_block:
            self._step_block(events, final=True)
        self._step_outside(events, final=True)
        return events

    def result(self) -> ParsedMessage:
        content = "".join(self._content)
        return ParsedMessage(None if self._calls and not content else content, list(self._calls))

    # -- outside blocks ---------------------------------------------------------------------------
    def _step_outside(self, events: list[StreamEvent], final: bool) -> bool:
        """Emit outside text; True when a block opened (so the caller goes on with its body)."""
        text = self._pending
        if self._after_block:
            text = text.lstrip()
            self._after_block = not text
        start = text.find(TOOL_CALL_START)
        if start >= 0:
            before = text[:start]
            self._emit_content(events, before.rstrip())
            self._ws_before = before[len(before.rstrip()):]
            self._pending = text[start + len(TOOL_CALL_START):]
            self._in_block, self._header_end, self._args_sent = True, -1, 0
            return True
        if final:
            self._emit_content(events, text)
            self._pending = ""
            return False
        # Hold back a possible start of the tag and trailing whitespace (it is dropped if a block follows).
        keep = len(text) - _partial_suffix(text, TOOL_CALL_START)
        keep = len(text[:keep].rstrip())
        self._emit_content(events, text[:keep])
        self._pending = text[keep:]
        return False

    def _emit_content(self, events: list[StreamEvent], text: str) -> None:
        if text:
            self._content.append(text)
            events.append(ContentDelta(text))

    # -- inside a block ---------------------------------------------------------------------------
    def _step_block(self, events: list[StreamEvent], final: bool) -> bool:
        """Stream what is known of the open block; True when it closed."""
        body = self._pending
        end = body.find(TOOL_CALL_END)
        closed = end >= 0
        if closed:
            region = body[:end]
        else:  # hold back what may be the start of the closing tag, unless the output has ended
            region = body if final else body[: len(body) - _partial_suffix(body, TOOL_CALL_END)]
        if self._header_end < 0:
            header = _HEADER.match(region)
            if header is not None:
                self._header_end = header.end()
                self._call_id, self._call_name = self._make_id(), json.loads(f'"{header.group(1)}"')
                events.append(ToolCallDelta(len(self._calls), "", self._call_id, self._call_name))
        done = closed or final
        call: ToolCall | None = None
        if self._header_end >= 0:
            args = region[self._header_end:].lstrip()
            if done:
                args = args.rstrip()
                args = args[:-1].rstrip() if args.endswith("}") else args
            else:
                args = args[: _ARGS_TAIL.search(args).start()]
            if len(args) > self._args_sent:
                events.append(ToolCallDelta(len(self._calls), args[self._args_sent:]))
                self._args_sent = len(args)
            if done:
                self._calls.append(ToolCall(self._call_id, self._call_name, args))
        elif done:
            call = _call_from_json(region, self._make_id)
            if call is not None:
                events.append(ToolCallDelta(len(self._calls), call.arguments, call.id, call.name))
                self._calls.append(call)
            else:  # not a call: the block is the model's text, verbatim
                tail = TOOL_CALL_END if closed else ""
                self._emit_content(events, self._ws_before + TOOL_CALL_START + region + tail)
        if not done:
            return False
        self._pending = body[end + len(TOOL_CALL_END):] if closed else ""
        self._in_block, self._after_block = False, self._header_end >= 0 or call is not None
        return True


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


_BARE_START = re.compile(r"(```(json)?\s*)?[\[{]")
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def _could_be_bare(text: str) -> bool:
    """Whether text may still grow into a bare JSON call (a JSON start, possibly fenced, or a fence's prefix)."""
    s = text.lstrip()
    return "```json".startswith(s) or re.fullmatch(r"```(json)?\s*", s) is not None or _BARE_START.match(s) is not None


def _bare_calls(text: str, names: frozenset[str], make_id: Callable[[], str]) -> list[ToolCall]:
    """The calls if the whole text is one JSON call or a list of them (optionally in a ``` fence), else []."""
    text = text.strip()
    fenced = _FENCED.fullmatch(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return []
    objects = value if isinstance(value, list) else [value]
    if not objects or not all(isinstance(o, dict) and o.get("name") in names
                              and set(o) <= {"name", "arguments", "parameters"} for o in objects):
        return []
    return [c for c in (_call_from_obj(o, make_id) for o in objects) if c is not None]


def _call_from_json(body: str, make_id: Callable[[], str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _call_from_obj(obj, make_id)


def _call_from_obj(obj: Any, make_id: Callable[[], str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(make_id(), obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


# -- tool_choice grammars --------------------------------------------------------------------------
def function_tools(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each OpenAI function tool; ValueError for malformed tools."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools: item {i} must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools: item {i} needs function.name, a non-empty string")
        if name in out:
            raise ValueError(f"tools: item {i} repeats the function name {name!r}")
        params = function.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise ValueError(f"tools: item {i}'s function.parameters must be a JSON Schema object")
        out[name] = params
    return out


def tool_choice_spec(tools: list[dict[str, Any]] | None, tool_choice: Any,
                     parallel_tool_calls: bool | None = None) -> dict[str, Any] | None:
    """The structured-output spec that enforces tool_choice, or None when the model chooses freely.

    "none" / "auto" / absent -> None. "required" -> one or more calls, each to a declared tool with
    arguments valid for its parameters (exactly one when parallel_tool_calls is False).
    {"type": "function", "function": {"name": n}} -> exactly one call to n.
    The calls are Qwen's `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` blocks (separated by
    "\\n"), so `parse_tool_calls` reads the output like any other answer. One "\\n" may follow the last call:
    a model that ends its turn with "\\n" would otherwise be forced into one more call.
    Parameter objects are closed (`_closed`): a 0.5B model otherwise adds keys such as "type" or "required"
    to its arguments, which the schema allows but no tool expects.
    """
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    declared = function_tools(tools)
    if tool_choice == "required":
        if not declared:
            raise ValueError("tool_choice 'required' needs at least one tool in 'tools'")
        several = parallel_tool_calls is not False
        names, start = list(declared), 'start: tool_call ("\\n" tool_call)* "\\n"?' if several else 'start: tool_call "\\n"?'
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in declared:
            raise ValueError(f"tool_choice names function {name!r}, which is not in 'tools'")
        names, start = [name], 'start: tool_call "\\n"?'
    else:
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    # <tool_call> / </tool_call> are single tokens in Qwen's vocabulary and the model writes them as such.
    # llguidance treats added tokens as special: they must be referenced as tokens (<name>); a quoted
    # "<tool_call>" is text, and llguidance rejects the model's tag token against it.
    lines = [start, 'tool_call: <tool_call> "\\n" call "\\n" </tool_call>',
             "call: " + " | ".join(f"call_{i}" for i in range(len(names)))]
    for i, name in enumerate(names):
        arguments = _closed(declared[name])
        # References such as "#/$defs/Address" (pydantic's, instructor's) resolve from the document root: the
        # parameters' definitions move to the root of the wrapper, where they find them.
        definitions = {k: arguments[k] for k in ("$defs", "definitions") if k in arguments}
        arguments = {k: v for k, v in arguments.items() if k not in definitions}
        schema = {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_FORMAT,
                  **definitions}
        lines.append(f"call_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return {"type": "lark", "grammar": "\n".join(lines) + "\n"}


def _closed(schema: Any) -> Any:
    """A copy of a parameters schema where every object listing "properties" allows no other keys, unless it
    says otherwise (additionalProperties / patternProperties) or combines schemas with allOf (closing each
    part would make the whole unsatisfiable)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict) or "allOf" in schema:
        return schema
    out = {k: ({n: _closed(v) for n, v in schema[k].items()} if k in ("properties", "$defs", "definitions")
               and isinstance(schema[k], dict) else _closed(schema[k]) if k in ("items", "anyOf", "oneOf") else schema[k])
           for k in schema}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out
