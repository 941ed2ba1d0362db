"""Structured-output specs: validate the user's dict, give it a canonical cache key, turn it into an llguidance grammar.

A spec is one of
    {"type": "json_object"}                                   any JSON object
    {"type": "json_schema", "schema": {...}, "strict": bool}  a JSON value valid against the schema
    {"type": "lark", "grammar": "..."}                        llguidance's Lark dialect (the server's tool grammars)
    {"type": "regex", "pattern": "..."}                       text matching the regular expression (vLLM's guided_regex)
    {"type": "choice", "choices": ["...", ...]}               exactly one of the strings (vLLM's guided_choice)
The OpenAI wrapper {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} is accepted too, so the
server may pass `response_format` through unchanged.

JSON is generated on one line with ", " and ": " separators (`JSON_FORMAT`), the way Qwen writes JSON in its
tool calls. Free whitespace would let a small model fill the output with newlines and indentation until
`max_tokens` (a known failure of constrained decoding); a schema may still override this with llguidance's
own "x-guidance" key. `strict` is accepted and changes nothing: the output always conforms, and schema
keywords the engine cannot enforce are always an error (never silently ignored).

The grammar cannot make `max_tokens` long enough: when the limit comes first the output is the valid
prefix generated so far and finish_reason is "length" (as in OpenAI's API); "stop" means the grammar completed.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher


class StructuredOutputError(ValueError):
    """A spec the grammar engine cannot enforce: bad shape, invalid grammar or unsupported schema keywords."""


JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

SPEC_TYPES = ("json_object", "json_schema", "lark", "regex", "choice")


def normalize_spec(spec: Any) -> dict[str, Any]:
    """The spec in its contract form ({"type", "schema"|"grammar", ...}); StructuredOutputError if malformed."""
    if not isinstance(spec, dict):
        raise StructuredOutputError(f"structured output spec must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        body = spec.get("json_schema", spec)  # OpenAI's response_format nests name/schema/strict
        if not isinstance(body, dict):
            raise StructuredOutputError("json_schema must be an object holding 'schema'")
        schema = body.get("schema")
        if not isinstance(schema, dict):
            raise StructuredOutputError("json_schema needs 'schema': a JSON Schema object")
        strict = body.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise StructuredOutputError("json_schema 'strict' must be a boolean")
        return {"type": "json_schema", "schema": schema}  # strict changes nothing (see above): not in the key
    if kind == "lark":
        grammar = spec.get("grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise StructuredOutputError("lark spec needs 'grammar': a non-empty string")
        return {"type": "lark", "grammar": grammar}
    if kind == "regex":
        pattern = spec.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise StructuredOutputError("regex spec needs 'pattern': a non-empty string")
        return {"type": "regex", "pattern": pattern}
    if kind == "choice":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise StructuredOutputError("choice spec needs 'choices': a list of non-empty strings")
        return {"type": "choice", "choices": list(choices)}
    raise StructuredOutputError(f"structured output type must be one of {', '.join(SPEC_TYPES)}; got {kind!r}")


def spec_key(spec: dict[str, Any]) -> str:
    """Canonical JSON of a normalized spec: equal specs (whatever their key order) share one compiled grammar."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def grammar_for_spec(spec: dict[str, Any]) -> str:
    """llguidance's serialized grammar for a normalized spec (not yet checked: the matcher does that)."""
    if spec["type"] == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_FORMAT)
    if spec["type"] == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec["schema"], defaults=JSON_FORMAT)
    if spec["type"] == "regex":
        return LLMatcher.grammar_from_regex(spec["pattern"])
    if spec["type"] == "choice":
        # Lark string literals take JSON's escapes; one alternative per choice.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec["choices"])
        return LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    return LLMatcher.grammar_from_lark(spec["grammar"])
