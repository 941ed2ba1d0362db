"""Pydantic request and response models in the shapes of OpenAI's API (plus vLLM's extra sampling fields).

Requests ignore unknown fields (clients send `store`, `metadata`, ... that mean nothing here) but
check every field they know: a bad value becomes a 400 with `param` naming the field, never a 500.
Checks that span several fields live in `validate()` methods and raise `ValueError("field: why")`.
Responses are built as these models so their JSON is exactly what the OpenAI SDK parses.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_serializer, model_validator

MAX_STOP_STRINGS = 64
MAX_N = 128
MAX_TOP_LOGPROBS = 20
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(_Request):
    name: str = "schema"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_output(self) -> dict[str, Any] | None:
        """The engine's `SamplingParams.structured_output` for this format (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("response_format: type json_schema needs json_schema.schema")
        return {"type": "json_schema", "schema": self.json_schema.schema_}


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs` object: one of json / regex / choice (grammar is refused below)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(_Request):
    """Fields shared by chat and completions requests, mapped onto SamplingParams."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's range
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling fields.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output: OpenAI's response_format, vLLM's guided_* fields and its newer structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM request fields this server does not implement: refused when set (`check_common`), because
    # ignoring them would answer a different request than the one sent.
    use_beam_search: bool = False
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    return_tokens_as_token_ids: bool = False
    refused: ClassVar[tuple[str, ...]] = (
        "use_beam_search", "bad_words", "truncate_prompt_tokens", "return_tokens_as_token_ids")

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if v == "" or (isinstance(v, list) and "" in v):  # would stop before the first token, as OpenAI refuses
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and not all(k.isdigit() for k in v):
            raise ValueError("keys must be token ids (non-negative integers as strings)")
        if v is not None and any(math.isnan(b) for b in v.values()):
            raise ValueError("values must be numbers")
        return v

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with integer token ids, each value clamped to [-100, 100] (as OpenAI and vLLM)."""
        if not self.logit_bias:
            return None
        return {int(k): min(100.0, max(-100.0, v)) for k, v in self.logit_bias.items()}

    def structured_spec(self) -> tuple[dict[str, Any], str] | None:
        """The engine's `SamplingParams.structured_output` asked for by this request, and the field that
        asked (for error messages); None for free text. ValueError when two fields ask, or for a grammar
        (vLLM's guided_grammar is EBNF or Lark depending on its backend: refused rather than guessed)."""
        so = self.structured_outputs
        asked = _vllm_specs("guided_", self.guided_json, self.guided_regex, self.guided_choice)
        asked.append(("response_format", self.response_format.structured_output() if self.response_format else None))
        if so is not None:
            asked += _vllm_specs("structured_outputs.", so.json_, so.regex, so.choice)
            asked.append(("structured_outputs.json_object", {"type": "json_object"} if so.json_object else None))
        for name, grammar in (("guided_grammar", self.guided_grammar), ("structured_outputs.grammar", so and so.grammar)):
            if grammar is not None:
                raise ValueError(f"{name}: grammars are not supported; use a JSON schema, a regex or a choice")
        given = [(name, spec) for name, spec in asked if spec is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1][0]}: give only one of {', '.join(name for name, _ in given)}")
        return (given[0][1], given[0][0]) if given else None

    def check_common(self) -> None:
        for name in self.refused:
            if getattr(self, name) not in (None, False):
                raise ValueError(f"{name}: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")


def _vllm_specs(prefix: str, schema: dict[str, Any] | str | None, regex: str | None,
                choices: list[str] | None) -> list[tuple[str, dict[str, Any] | None]]:
    """(field, spec or None) for one family of vLLM's fields: guided_json/_regex/_choice, or
    structured_outputs.json/.regex/.choice."""
    return [
        (f"{prefix}json", _json_schema_spec(f"{prefix}json", schema)),
        (f"{prefix}regex", None if regex is None else {"type": "regex", "pattern": regex}),
        (f"{prefix}choice", None if choices is None else {"type": "choice", "choices": choices}),
    ]


def _json_schema_spec(name: str, schema: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """vLLM's guided_json: a JSON Schema as an object or as a JSON string."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: not valid JSON ({err.msg})") from None
    if schema is None:
        return None
    if not isinstance(schema, dict):
        raise ValueError(f"{name}: must be a JSON Schema object")
    return {"type": "json_schema", "schema": schema}


def _check_continuation(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message: set add_generation_prompt to false to continue the last message")


# ---------------------------------------------------------------- chat

class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _required_fields(self) -> "ChatMessage":
        """What OpenAI requires of each role: content (an assistant may send tool calls instead), and a
        tool result names the call it answers."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            need = "content or tool_calls" if self.role == "assistant" else "content"
            raise ValueError(f"a {self.role} message needs {need}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """Refused whatever tool_choice is: under "auto" nothing else would ever read the schema."""
        if v is not None:
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(v)
            except SchemaError as e:
                raise ValueError(f"not a valid JSON schema: {e.message}") from None
        return v


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: dict[str, str]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras for the template.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the prompt ends inside the last (assistant) message
    # vLLM chat extras this server does not implement (refused when set, see SamplingFields).
    echo: bool = False
    chat_template: str | None = None
    documents: list[dict[str, Any]] | None = None
    prompt_logprobs: int | None = None
    refused: ClassVar[tuple[str, ...]] = SamplingFields.refused + ("echo", "chat_template", "documents", "prompt_logprobs")

    def validate_fields(self) -> None:
        self.check_common()
        _check_continuation(self.add_generation_prompt, self.continue_final_message)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- completions

# str | list[str] | list[int] | list[list[int]]; StrictInt keeps "1" and true out of token lists.
PromptInput = str | list[StrictInt] | list[str] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=0)  # 0 with echo: the prompt (and its logprobs) alone
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    # vLLM's extra: each prompt token's logprob and top alternatives, in choice.prompt_logprobs.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def validate_fields(self) -> None:
        self.check_common()
        if self.suffix is not None and self.echo:
            raise ValueError("suffix: cannot be used with echo")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs: not available when stream is true")

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """What the engine computes for the prompt: prompt_logprobs, else (as vLLM) echo's logprobs.
        An echo with max_tokens 0 runs only the prompt, which the engine does for its logprobs."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            return self.logprobs
        return 0 if self.max_tokens == 0 else None

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------- tokenize

class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: a prompt gets them, a rendered chat not (its template has them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def validate_fields(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        _check_continuation(self.add_generation_prompt, self.continue_final_message)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---------------------------------------------------------------- responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking (--reasoning-parser), as vLLM names it
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"content": "x"}, never {"role": null, ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's shape of one token's entry in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's extra, with the request's prompt_logprobs: per prompt token, token id -> entry (None first).
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwen-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- responses (OpenAI's Responses API)

class ResponseTextFormat(_Request):
    """`text.format`: plain text, any JSON object, or JSON matching `schema`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "schema"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> dict[str, Any]:
        """The same request as chat's response_format."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema_, "strict": self.strict}}


class ResponseTextConfig(_Request):
    format: ResponseTextFormat = Field(default_factory=ResponseTextFormat)


class FunctionTool(_Request):
    """A Responses-API tool: the function's fields at the top level (chat nests them under `function`)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: ResponseTextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Fields whose other values this server cannot honour: refused rather than ignored.
    background: bool = False
    truncation: Literal["disabled", "auto"] = "disabled"
