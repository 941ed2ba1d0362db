"""The step contract between the engine and its workers: plain, picklable data in and out.

The engine turns its scheduler's output (live `Sequence` objects) into a `StepInput` once per step;
a worker in the engine's process receives the object itself, worker processes receive it pickled.
Everything a worker needs to compute and sample the step is here, by value: the chunk's token ids,
its block table, each sampling row's settings, and (for structured output) the bitmask of tokens each
row's grammar allows, filled by the engine, which owns the grammars. A worker keeps across steps
only what it derives from these (seeded generators, the last step's tokens on the device).
(The shape of vLLM v1's `SchedulerOutput` / `ModelRunnerOutput`: ids and tokens, not engine objects.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """One request's sampling settings, built once per request (the worker reads nothing else of it)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # top alternatives besides the sampled token; None: no logprobs
    prompt_logprobs: int | None = None

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(slots=True)
class SampleRow:
    """A sequence that samples its next token from the last row of a chunk."""

    seq_id: int
    settings: SamplingSettings
    sample_index: int  # k of a request's n samples (seeded samples differ by it)
    num_output_tokens: int  # generated so far, the one still on the device included (min_tokens)
    # Penalties count tokens: sent only for rows whose settings use them (their steps are not overlapped).
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None


@dataclass(slots=True)
class ChunkInput:
    """`num_tokens` tokens of sequence `seq_id` from position `start`. `token_ids` has them all, or all
    but the last when that one was sampled by the previous step and is still on the device."""

    seq_id: int
    start: int
    num_tokens: int
    token_ids: list[int]
    block_ids: list[int]  # the sequence's block table
    samples: list[SampleRow]  # [] for a prompt chunk that does not reach the end
    # Speculative drafts at the chunk's end: its one sample row samples each of the last drafts + 1 rows
    # (row j as if j more tokens had been generated).
    num_draft_tokens: int = 0
    # Prompt logprobs: how many of the chunk's rows predict a prompt token (0: none asked), the top-k
    # asked, and the tokens those rows predict.
    prompt_rows: int = 0
    prompt_top_k: int = 0
    prompt_targets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class StepInput:
    chunks: list[ChunkInput]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): before the forward pass
    finished_seq_ids: list[int] = field(default_factory=list)  # gone since the last step: drop their state
    # Structured output: int32 [num sample rows, ceil(vocab / 32)], bit t of a row set when token t is
    # allowed; None when no row has a grammar.
    grammar_bitmask: np.ndarray | None = None

    @property
    def sample_rows(self) -> list[SampleRow]:
        return [s for c in self.chunks for s in c.samples]


@dataclass(slots=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float | None = None  # of the sampled token, under the model's distribution
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # the top alternatives (token id, logprob)


@dataclass(slots=True)
class PromptLogprobs:
    """One chunk's entries: entry i is for prompt token `first + i` (predicted by the row before it)."""

    seq_id: int
    first: int
    logprobs: list[float]  # of the prompt token
    ranks: list[int]  # of the prompt token, 1 = most likely
    top: list[list[tuple[int, float]]]  # the top-k alternatives (token id, logprob), best first


@dataclass(slots=True)
class RunnerOutput:
    sampled: list[SampledToken]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # prompt chunks that asked for them
