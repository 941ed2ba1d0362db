"""Speculative decoding (`--speculative-config`, vLLM's flag): drafts by prompt lookup or from a draft model.

`{"method": "ngram", ...}`: a decoding sequence whose last tokens (an n-gram of `prompt_lookup_max` down to
`prompt_lookup_min` tokens) occurred earlier in its prompt or output proposes the tokens that followed that
earlier occurrence, up to `num_speculative_tokens`. `{"model": ..., ...}`: a small model of the same
vocabulary (its own engine and KV cache, prefix caching on, so each proposal recomputes little) continues
the sequence greedily for that many tokens. One forward pass of the served model then computes the sequence's
last token and its drafts, and each of those k + 1 rows is sampled with the request's own settings.
Draft i is accepted while the token sampled at the row before it equals it; the first row whose
sample differs (or the row after the last draft) gives one more token. So a step adds 1..k + 1 tokens.

Why this keeps the model's distribution exactly: either proposer's draft is one token with probability 1
(the draft model proposes its argmax), and for such a draft the rejection sampling of the speculative-decoding papers (accept d with
probability min(1, p(d) / q(d)) = p(d), else sample from p with d removed) is the same as sampling
x ~ p and accepting when x == d, which is what the rows do. Greedy output is therefore token for token
the output without speculation; seeded sampling draws its random numbers in another order, so the same
seed gives other (equally distributed) tokens.

The KV entries the rejected drafts wrote are left where they are: the sequence's computed count is
moved back, so they are never read and the next step overwrites them. Drafts never enter the
sequence's tokens until accepted, so the prefix cache only ever hashes accepted tokens.

With a grammar (structured output), drafts are cut to the longest run the grammar allows, and each
verifying row is masked by what the grammar allows after the drafts before it (engine/step_builder.py);
while a reasoning model thinks, drafts stop before the end of thinking, after which the grammar applies.
Not speculated: requests with repetition / frequency / presence penalties (they count the tokens before
each row), steps with more running sequences than `disable_by_batch_size` (vLLM's key; default 8), where
decode is no longer bound by reading weights and verifying drafts costs more than it saves, and stretches
where few drafts are accepted (`SpeculationGate`). A draft model proposes for one sequence at a time, and
not under tensor parallelism.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from qwen_serve.engine.llm_engine import LLMEngine

MAX_SPECULATIVE_TOKENS = 16
_COMMON = {"method", "num_speculative_tokens", "disable_by_batch_size"}
_KEYS = {"ngram": _COMMON | {"prompt_lookup_max", "prompt_lookup_min"}, "draft_model": _COMMON | {"model"}}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    disable_by_batch_size: int = 8
    method: str = "ngram"
    model: str | None = None  # draft_model: a folder, .gguf file, hub id or "demo"

    @classmethod
    def parse(cls, text: str | None) -> "SpeculativeConfig | None":
        """`--speculative-config` as vLLM takes it (a JSON object); ValueError naming what is wrong."""
        if text is None:
            return None
        flag = "--speculative-config"
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag}: not a JSON object ({e})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{flag}: must be a JSON object such as "
                             f'{{"method": "ngram", "num_speculative_tokens": 4}}')
        method = spec.get("method", "draft_model" if "model" in spec else "ngram")
        if method not in _KEYS:
            raise ValueError(f"{flag}: method {method!r} is not supported; supported: {sorted(_KEYS)} "
                             f'("draft_model" is also what a "model" key alone asks for)')
        unknown = sorted(set(spec) - _KEYS[method])
        if unknown:
            raise ValueError(f"{flag}: unknown keys {unknown} for method {method!r}; known: {sorted(_KEYS[method])}")
        values: dict[str, Any] = {k: v for k, v in spec.items() if k not in ("method", "model")}
        if "num_speculative_tokens" not in values:
            raise ValueError(f"{flag}: num_speculative_tokens is required")
        if method == "draft_model" and (not isinstance(spec.get("model"), str) or not spec["model"]):
            raise ValueError(f"{flag}: method draft_model needs \"model\": a folder, .gguf file, hub id or \"demo\"")
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag}: {key} must be a positive integer, got {value!r}")
        config = cls(**values, method=method, model=spec.get("model"))
        if config.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"{flag}: num_speculative_tokens must be 1..{MAX_SPECULATIVE_TOKENS}, "
                             f"got {config.num_speculative_tokens}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"{flag}: prompt_lookup_min ({config.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({config.prompt_lookup_max})")
        return config


class Proposer(Protocol):
    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` (and num_speculative_tokens) drafts to follow `token_ids`; [] for none."""


@dataclass(frozen=True, slots=True)
class NgramProposer:
    config: SpeculativeConfig

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """What followed the latest earlier occurrence of the longest final n-gram (prompt_lookup_max down to
        prompt_lookup_min tokens) that occurred before; [] if none did."""
        c = self.config
        k = min(c.num_speculative_tokens, max_tokens)
        if k <= 0 or len(token_ids) < c.prompt_lookup_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(c.prompt_lookup_max, len(tokens) - 1), c.prompt_lookup_min - 1, -1):
            # Windows starting before the final n-gram's own start, so that some token follows each.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + k].tolist()
        return []


class DraftModelProposer:
    """Greedy continuations from a draft model's own engine (built by `make_proposer`)."""

    def __init__(self, engine: "LLMEngine", config: SpeculativeConfig) -> None:
        self.engine = engine
        self.k = config.num_speculative_tokens
        self._ids = count()

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        k = min(self.k, max_tokens, self.engine.max_model_len - len(token_ids))
        if k <= 0:
            return []
        from qwen_serve.engine.sampling_params import RequestOutputKind, SamplingParams

        request_id, drafts = f"draft-{next(self._ids)}", []
        self.engine.add_request(request_id, token_ids, SamplingParams(
            temperature=0.0, max_tokens=k, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id == request_id and out.finished:
                    drafts = list(out.outputs[0].token_ids)
        return drafts

    def close(self) -> None:
        self.engine.close()


def make_proposer(config: SpeculativeConfig, target: "LLMEngine") -> Proposer:
    """The proposer `config` asks for; a draft model is loaded here, on the target's device, and refused
    when its vocabulary is not the target's or the target is split over several GPUs."""
    if config.method == "ngram":
        return NgramProposer(config)
    from dataclasses import replace

    from qwen_serve.engine.llm_engine import LLMEngine

    flag = "--speculative-config"
    if target.config.tensor_parallel_size > 1:
        raise ValueError(f"{flag}: a draft model is not supported with --tensor-parallel-size > 1")
    # One request at a time, so a KV cache of twice the served context (the second half keeps prefixes cached
    # between proposals), a fixed size: on a GPU the served model's profile already took its share.
    bs = target.config.block_size
    draft_config = replace(target.config, model=config.model, tokenizer=None, chat_template=None,
                           speculative_config=None, quantization=None, enable_prefix_caching=True, overlap_steps="off",
                           max_num_seqs=1,
                           max_model_len=target.max_model_len, num_kv_blocks=2 * -(-target.max_model_len // bs))
    draft = LLMEngine.from_config(draft_config)
    problem = None
    if draft.model_config.vocab_size != target.model_config.vocab_size:
        problem = f"{draft.model_config.vocab_size} logits, the served model {target.model_config.vocab_size}"
    elif target.tokenizer is not None and draft.tokenizer is not None \
            and draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
        problem = "its tokenizer's vocabulary differs from the served model's"
    if problem is not None:
        draft.close()
        raise ValueError(f"{flag}: draft model {config.model!r} has another vocabulary ({problem})")
    return DraftModelProposer(draft, config)


@dataclass(slots=True)
class SpeculationGate:
    """Pauses speculation while it does not pay. A speculating step is not overlapped with the next one and
    verifies k + 1 rows a sequence, so where few drafts are accepted (text that repeats nothing, a draft
    model that guesses badly) it is slower than plain decode (the 7B on an H100 with drafts never accepted:
    ~4%, BENCHMARKS.md run 43). Speculation starts, and restarts after each pause, with a probe: the mean of
    the drafts accepted per sequence over `probe_steps` speculating steps; below `min_gain` it pauses for
    `pause_steps` steps, doubled after each probe that fails again, up to `max_pause_steps`. A probe that
    passes hands over to a moving average, which closes the gate the same way when it falls below
    `min_gain`. The probes are what a workload that never gains pays: on the H100's worst case 0.974x of
    plain decode with a fixed pause and ~11-step probes (run 44), 0.993x with these (run 46). Engines that
    do not overlap steps (the CPU's) keep it open (min_gain 0): there a verify step costs about what a plain
    one does, and pausing cut the demo's plain-chat speed-up from 1.58x to 1.14-1.27x (BENCHMARKS.md).

    With `shadow` (prompt lookup, whose drafts cost a host-side search) a closed gate needs no probe: the
    engine proposes drafts for the sequences it decodes without verifying them (`ShadowDrafts`), and each
    proposal, once the tokens it guessed are decoded, gives the drafts speculation would have had accepted
    (`record_shadow`). The same moving average takes those while closed and the verify steps' outcomes while
    open; it opens at 2 min_gain and closes below min_gain. It starts closed, so a workload that never gains
    verifies nothing at all."""

    min_gain: float = 0.1
    pause_steps: int = 64
    max_pause_steps: int = 512
    probe_steps: int = 4
    weight: float = 1 / 16  # of the newest step in the average (~16 steps of memory)
    gain: float = 0.0  # the moving average, once a probe has passed
    probing: int = field(init=False)  # speculating steps left in the current probe
    probe_total: float = 0.0
    paused_for: int = 0
    closes: int = 0  # in a row, without the average recovering to 2 min_gain in between
    shadow: bool = False
    closed: bool = field(init=False)  # with shadow: until the shadow drafts show a gain

    def __post_init__(self) -> None:
        self.probing = 0 if self.shadow else self.probe_steps
        self.closed = self.shadow and self.min_gain > 0

    def open(self) -> bool:
        """Whether this step may speculate (called once a step while speculation is on)."""
        if self.shadow:
            return not self.closed
        if self.paused_for == 0:
            return True
        self.paused_for -= 1
        if self.paused_for == 0:
            self.probing, self.probe_total = self.probe_steps, 0.0
        return False

    def record(self, accepted: int, num_seqs: int) -> None:
        """A speculating step's outcome: `accepted` drafts over its `num_seqs` sampling sequences."""
        rate = accepted / max(num_seqs, 1)
        if self.shadow:
            self.gain += self.weight * (rate - self.gain)
            self.closed = self.gain < self.min_gain
            return
        if self.probing:
            self.probe_total += rate
            self.probing -= 1
            if self.probing:
                return
            self.gain = self.probe_total / self.probe_steps
        else:
            self.gain += self.weight * (rate - self.gain)
        if self.gain >= 2 * self.min_gain:
            self.closes = 0
        elif self.gain < self.min_gain:
            self.paused_for = min(self.pause_steps << min(self.closes, 16), self.max_pause_steps)
            self.closes += 1

    def record_shadow(self, accepted: int) -> None:
        """With shadow: one unverified proposal's outcome, the drafts the decoded tokens matched."""
        self.gain += self.weight * (accepted - self.gain)
        if self.gain >= 2 * self.min_gain:
            self.closed = False


def matched(drafts: list[int], tokens: list[int]) -> int:
    """How many drafts verifying would accept before these decoded tokens: the leading ones they equal."""
    n = 0
    while n < len(drafts) and n < len(tokens) and drafts[n] == tokens[n]:
        n += 1
    return n


@dataclass(slots=True)
class ShadowDrafts:
    """Drafts proposed for sequences that decode without them while the gate is closed, each kept (with the
    position of the token it guesses first) until the tokens it guessed are decoded. One proposal a sequence
    every k + 1 tokens: a sample of the steps that does not depend on their outcome, at a fraction of the
    lookups' host time (a search through the whole context each)."""

    proposer: Proposer
    k: int
    pending: dict[int, list[tuple[int, list[int]]]] = field(default_factory=dict)  # seq id -> proposals
    next_at: dict[int, int] = field(default_factory=dict)  # seq id -> length at which it proposes again

    def propose(self, seq_id: int, token_ids: list[int]) -> None:
        """A proposal from the tokens decoded so far (a step may still be computing the next one), if due."""
        if len(token_ids) < self.next_at.get(seq_id, 0):
            return
        self.next_at[seq_id] = len(token_ids) + self.k + 1
        self.pending.setdefault(seq_id, []).append((len(token_ids), self.proposer.propose(token_ids, self.k)))

    def resolve(self, seq_id: int, token_ids: list[int]) -> list[int]:
        """The drafts each proposal would have had accepted, for those whose guessed tokens are all decoded
        now (or that a mismatch already decides)."""
        proposals = self.pending.get(seq_id)
        if not proposals:
            return []
        done, left = [], []
        for start, drafts in proposals:
            decoded = token_ids[start : start + len(drafts)]
            n = matched(drafts, decoded)
            if n < len(decoded) or len(decoded) == len(drafts):  # a mismatch decided it, or all are decoded
                done.append(n)
            else:
                left.append((start, drafts))
        if left:
            self.pending[seq_id] = left
        else:
            del self.pending[seq_id]
        return done

    def forget(self, seq_id: int) -> None:
        self.pending.pop(seq_id, None)
        self.next_at.pop(seq_id, None)


@dataclass(slots=True)
class SpeculationStats:
    """Counters for /metrics, named as vLLM names its own (spec_decode_num_drafts, ...)."""

    num_drafts: int = 0  # verify rows-sets: one per drafted sequence per step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
