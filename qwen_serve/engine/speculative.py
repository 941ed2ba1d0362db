"""Speculative decoding by prompt lookup (`--speculative-config '{"method": "ngram", ...}'`, vLLM's flag).

A decoding sequence whose last tokens (an n-gram of `prompt_lookup_max` down to `prompt_lookup_min`
tokens) occurred earlier in its prompt or output proposes the tokens that followed that earlier
occurrence as drafts, up to `num_speculative_tokens`. One forward pass then computes the sequence's
last token and its drafts, and each of those k + 1 rows is sampled with the request's own settings.
Draft i is accepted while the token sampled at the row before it equals it; the first row whose
sample differs (or the row after the last draft) gives one more token. So a step adds 1..k + 1 tokens.

Why this keeps the model's distribution exactly: a draft from lookup is one token with probability 1,
and for such a draft the rejection sampling of the speculative-decoding papers (accept d with
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
each row), and steps with more running sequences than
`disable_by_batch_size` (vLLM's key; default 8), where decode is no longer bound by reading weights and
verifying drafts costs more than it saves. Proposing from a draft model is not supported yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_SPECULATIVE_TOKENS = 16
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    disable_by_batch_size: int = 8
    method: str = "ngram"

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
        if "model" in spec or spec.get("method", "ngram") not in ("ngram",):
            what = f"draft model {spec['model']!r}" if "model" in spec else f"method {spec.get('method')!r}"
            raise ValueError(f"{flag}: {what} is not supported; qwen-serve proposes drafts by prompt lookup "
                             f'("method": "ngram")')
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise ValueError(f"{flag}: unknown keys {unknown}; known: {sorted(_KEYS)}")
        values: dict[str, Any] = {k: v for k, v in spec.items() if k != "method"}
        if "num_speculative_tokens" not in values:
            raise ValueError(f"{flag}: num_speculative_tokens is required")
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag}: {key} must be a positive integer, got {value!r}")
        config = cls(**values)
        if config.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"{flag}: num_speculative_tokens must be 1..{MAX_SPECULATIVE_TOKENS}, "
                             f"got {config.num_speculative_tokens}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"{flag}: prompt_lookup_min ({config.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({config.prompt_lookup_max})")
        return config

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` drafts: what followed the latest earlier occurrence of the longest final
        n-gram (prompt_lookup_max down to prompt_lookup_min tokens) that occurred before; [] if none did."""
        k = min(self.num_speculative_tokens, max_tokens)
        if k <= 0 or len(token_ids) < self.prompt_lookup_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.prompt_lookup_max, len(tokens) - 1), self.prompt_lookup_min - 1, -1):
            # Windows starting before the final n-gram's own start, so that some token follows each.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + k].tolist()
        return []


@dataclass(slots=True)
class SpeculationStats:
    """Counters for /metrics, named as vLLM names its own (spec_decode_num_drafts, ...)."""

    num_drafts: int = 0  # verify rows-sets: one per drafted sequence per step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
