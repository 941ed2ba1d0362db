"""What the engine hands back: per-request outputs (with deltas for streaming) and engine counters.

These are plain dataclasses without torch, so the server can import them cheaply. Each
`RequestOutput` from `LLMEngine.step()` carries the full text so far in `text` / `token_ids`
and only this step's new part in `delta_text` / `delta_token_ids` / `delta_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str


# One position: token id -> Logprob, holding the sampled (or prompt) token and the top alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the sample; None for eos or length.
    stop_reason: str | int | None = None
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[PositionLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs: one entry per prompt token, the first None (nothing
    # predicts it). Complete in every output, since a request's first output follows its prompt.
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_free: int  # free or evictable (cached but unreferenced)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    num_preemptions: int
    # Speculative decoding (vLLM's spec_decode counters): whether it is on, sequences x steps that carried
    # drafts, drafts proposed, drafts accepted.
    speculative: bool = False
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
