"""Renders a model's own chat template (Jinja) the way transformers' `apply_chat_template` does.

The template comes from the checkpoint, so it is untrusted code: it runs in Jinja's
`ImmutableSandboxedEnvironment` with exactly the helpers transformers gives templates
(`raise_exception`, a `tojson` that does not HTML-escape, `strftime_now`, a guarded `namespace`,
`dict`, loop controls, trim_blocks + lstrip_blocks). Messages and tools are checked and copied into
plain JSON types before rendering; every failure surfaces as `ChatTemplateError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

VALID_ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplateError(ValueError):
    """A malformed message list, or a template that fails to compile or render."""


def read_chat_template(value: str) -> str:
    """A `--chat-template` value as template text, read as vLLM reads it: the file at that path when one opens,
    else the value itself when it looks like Jinja (has a brace or a line break); anything else is a file
    that is not there."""
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if any(c in value for c in "{}\n"):
            return value
        raise ChatTemplateError(f"{value!r} is neither a readable file ({e.strerror}) nor a Jinja template") from None
    except UnicodeDecodeError:
        raise ChatTemplateError(f"{value}: not a UTF-8 text file") from None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would change what the model sees;
    # transformers replaces it with plain json.dumps (non-ASCII kept), and so do we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses dunder/underscore attributes (no way into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by some templates to mark assistant text)
    and renders its body unchanged, as transformers does when no assistant mask is asked for."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = dict
    return env


def _plain(value: Any, where: str) -> Any:
    """A deep copy in plain JSON types, so the template can reach no caller object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, numpy scalars) are cut back to the base type, losing their extra methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if callable(getattr(value, "model_dump", None)):  # pydantic models from the HTTP layer
        return _plain(value.model_dump(), where)
    raise ChatTemplateError(f"{where}: a value of type {type(value).__name__} cannot be passed to a chat template")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks the shape of a conversation and returns a plain copy of it."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"{where} must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in VALID_ROLES:
            raise ChatTemplateError(f"{where}.role must be one of {', '.join(VALID_ROLES)}; got {role!r}")
        content = msg.get("content")
        if content is None and role != "assistant":
            raise ChatTemplateError(f"{where} (role {role}) needs a 'content'")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise ChatTemplateError(f"{where}.content must be a string or a list of content parts")
        if isinstance(content, (list, tuple)) and not all(isinstance(p, Mapping) for p in content):
            raise ChatTemplateError(f"{where}.content: each content part must be an object")
        calls = msg.get("tool_calls")
        if calls is not None and (not isinstance(calls, (list, tuple)) or not all(isinstance(c, Mapping) for c in calls)):
            raise ChatTemplateError(f"{where}.tool_calls must be a list of objects")
        out.append(_plain(msg, where))
    return out


class ChatTemplate:
    """One compiled chat template; `render` is what `Tokenizer.apply_chat_template` calls."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("the chat template is empty")
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None

    def render(self, messages: Any, tools: Any = None, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        chat = validate_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise ChatTemplateError("tools must be a list of JSON-schema objects")
            tools = _plain(tools, "tools")
        extra = {k: _plain(v, k) for k, v in kwargs.items()}
        try:
            return self._template.render(
                messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **extra
            )
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) lands here too
            raise ChatTemplateError(f"chat template error: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
            # A template that assumes a shape these messages do not have (e.g. iterates over a None).
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
