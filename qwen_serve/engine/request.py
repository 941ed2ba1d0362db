"""Request and sequence state, pure Python (no torch): what the scheduler and block manager track.

A `Request` is what a caller submitted; each of its `n` samples is a `Sequence`. A sequence only
knows its tokens (prompt + generated) and how many of them have their keys/values in the cache
(`num_computed_tokens`); "prefill" and "decode" are not states, just how far behind it is.
A request with n > 1 starts with one sequence; when its prompt is computed the scheduler forks
the others off it, sharing the prompt's KV blocks.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "seq_id", "request", "sample_index", "token_ids", "num_prompt_tokens", "num_computed_tokens",
        "block_ids", "block_hashes", "status", "num_cached_tokens", "num_preemptions", "constraint",
        "constraint_waits_for", "num_pending_tokens",
    )

    def __init__(self, request: "Request", sample_index: int, token_ids: list[int], num_prompt_tokens: int) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.sample_index = sample_index
        self.token_ids = token_ids  # prompt followed by the generated tokens
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or being written this step)
        # Tokens sampled on the device that have not reached token_ids yet: 1 between overlapped steps
        # (the next step is scheduled before the host has read this step's tokens), else 0.
        self.num_pending_tokens = 0
        self.block_ids: list[int] = []  # block table: block i holds tokens [i*block_size, (i+1)*block_size)
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.num_preemptions = 0
        # Structured-output state (a TokenConstraint), owned by the engine; opaque here. It constrains no
        # token until `constraint_waits_for` (a reasoning model's </think>) has been sampled.
        self.constraint: Any = None
        self.constraint_waits_for: int | None = getattr(request.params, "reasoning_end_token_id", None)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    def ends_with_pending(self, max_model_len: int | None) -> bool:
        """Its pending token is certain to be its last (max_tokens or max_model_len): nothing to schedule."""
        if not self.num_pending_tokens:
            return False
        max_tokens = getattr(self.request.params, "max_tokens", None)
        n = self.num_tokens_with_pending
        return (max_tokens is not None and n - self.num_prompt_tokens >= max_tokens) or (
            max_model_len is not None and n >= max_model_len)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def fork(self, sample_index: int) -> "Sequence":
        """A sibling with the same tokens and progress; blocks are shared by the block manager."""
        child = Sequence(self.request, sample_index, list(self.token_ids), self.num_prompt_tokens)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.status = self.status
        constraints = self.request.sample_constraints
        child.constraint = constraints[sample_index] if constraints else None
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_ids}, {self.status.value})")


class Request:
    """One submitted prompt and its samples. `params` is the engine's SamplingParams (duck-typed here)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: Any, arrival_time: float,
                 prompt: str | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.n: int = getattr(params, "n", 1)
        self.sequences: list[Sequence] = [Sequence(self, 0, list(prompt_token_ids), len(prompt_token_ids))]
        # One structured-output constraint per sample (set by the engine), handed to samples as they fork.
        self.sample_constraints: list[Any] | None = None
        self.settings: Any = None  # the params as the workers read them (engine/step_builder.py), made once
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def needs_fork(self) -> bool:
        return len(self.sequences) < self.n

    @property
    def is_finished(self) -> bool:
        # Asked for every request the engine touches each step: a loop, not all() over a generator.
        if self.needs_fork:
            return False
        for s in self.sequences:
            if s.status is not SequenceStatus.FINISHED:
                return False
        return True
