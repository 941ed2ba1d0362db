"""`SamplingParams`: how one request is sampled and when it stops (the vLLM-shaped user API).

The model's generation_config.json supplies defaults for the fields a caller leaves out, so the
params remember which fields were set explicitly (at construction or by assignment later);
`with_defaults` fills in the rest. Validation raises ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20

# generation_config.json key -> SamplingParams field (the keys vLLM also honours).
GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


class RequestOutputKind(enum.Enum):
    """Which steps hand back a request's output. CUMULATIVE: every step that gave it tokens, each output
    with the text and tokens so far and that step's deltas. FINAL_ONLY: only the step it finishes, whose
    deltas then hold everything (vLLM's offline `LLM` asks for this): a batch of requests nobody streams
    skips building an output per request per step."""

    CUMULATIVE = "cumulative"
    FINAL_ONLY = "final_only"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16  # None: up to max_model_len; 0 (with prompt_logprobs): only score the prompt
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives (0..20) besides the sampled token
    prompt_logprobs: int | None = None  # the same for each prompt token (0..20); None: off
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: dict[str, Any] | None = None
    # A reasoning model's </think>: structured output constrains only the tokens after it (the answer).
    reasoning_end_token_id: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (not to logprobs)
    allowed_token_ids: list[int] | None = None  # sample only among these (logprobs stay the model's)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Names of the fields the caller set; generation_config defaults never override these.
    _explicit: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Assignment after construction counts as "set explicitly" too.
        explicit = self.__dict__.get("_explicit")
        if explicit is not None and name != "_explicit":
            explicit.add(name)
        object.__setattr__(self, name, value)

    @property
    def explicit_fields(self) -> frozenset[str]:
        return frozenset(self._explicit)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingParams":
        """A copy where every field the caller did not set takes its value from `defaults`."""
        out = self.clone()
        for name, value in defaults.items():
            if name not in self._explicit and name in _FIELD_NAMES:
                object.__setattr__(out, name, value)
        return out

    def clone(self) -> "SamplingParams":
        out = dataclasses.replace(self)
        object.__setattr__(out, "_explicit", set(self._explicit))
        return out

    def validate(self) -> "SamplingParams":
        """Raises ValueError naming the first bad field; returns self so calls can chain."""
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty!r}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        _check(self.stop is None or isinstance(self.stop, str)
               or (isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop)),
               "stop", "must be a string or a list of strings")
        _check(self.stop_token_ids is None or (isinstance(self.stop_token_ids, list)
               and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids)),
               "stop_token_ids", "must be a list of non-negative integers")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1)
               or (self.max_tokens == 0 and self.prompt_logprobs is not None),
               "max_tokens", f"must be an integer >= 1 (or 0 with prompt_logprobs), got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        _check(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
               isinstance(t, int) and t >= 0 and _is_num(b) and math.isfinite(b) for t, b in self.logit_bias.items())),
               "logit_bias", "must map non-negative token ids to finite numbers")
        _check(self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
               and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
               "allowed_token_ids", "must be a non-empty list of non-negative token ids")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind",
               f"must be a RequestOutputKind, got {self.output_kind!r}")
        spec = self.structured_output
        _check(spec is None or (isinstance(spec, dict)
                                and spec.get("type") in ("json_object", "json_schema", "lark", "regex", "choice")),
               "structured_output", "must be a dict with type json_object, json_schema, lark, regex or choice")
        _check(self.reasoning_end_token_id is None or (isinstance(self.reasoning_end_token_id, int)
                                                       and self.reasoning_end_token_id >= 0),
               "reasoning_end_token_id", "must be a non-negative token id")
        return self


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams) if f.init)


def _track_explicit(init):
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        names = [f.name for f in dataclasses.fields(self) if f.init]
        object.__setattr__(self, "_explicit", set(names[: len(args)]) | set(kwargs))

    return __init__


SamplingParams.__init__ = _track_explicit(SamplingParams.__init__)  # type: ignore[method-assign]


def defaults_from_generation_config(generation_config: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams field values taken from a model's generation_config.json."""
    return {dst: generation_config[src] for src, dst in GENERATION_CONFIG_KEYS.items()
            if generation_config.get(src) is not None}


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
