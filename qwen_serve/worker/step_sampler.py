"""Sampling inputs and outputs of one step: per-request settings -> tensors, results -> host.

`StepSampler` owns the state sampling keeps across steps (one torch.Generator per seeded sample) and
is the only place where the runner's sampled tokens cross to the host: one device->host copy per step.
Its rows are `SampleRow`s (worker/step_input.py): settings and counts by value, no engine objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from qwen_serve.layers.sampler import SamplingTensors, apply_bitmask_, sample
from qwen_serve.worker.step_input import SampledToken, SampleRow


@dataclass(slots=True)
class PendingSample:
    """One step's sampling, queued on the device: `token_ids` stay there for the next step's inputs,
    `host` fills once `ready` (a CUDA event; None on the CPU) has passed."""

    rows: list[SampleRow]
    max_logprobs: int
    token_ids: torch.Tensor  # [n] int64, on the device
    host: torch.Tensor  # on the host: [n] int64 token ids, or float64 [n + logprob parts] with logprobs
    ready: torch.cuda.Event | None


class StepSampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: list[int],
                 to_device: Callable[[list, torch.dtype], torch.Tensor]) -> None:
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self._to_device = to_device
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> the generator of a seeded sample
        self.default_generator = torch.Generator(device=device).manual_seed(seed)
        # The last step's sampling tensors, kept when they depend on the rows' params alone (no
        # penalties, no min_tokens): a decode step of the same sequences in the same order, the usual
        # case between two finishes, takes them as they are instead of ~15 passes over its rows.
        self._reusable: tuple[list[int], SamplingTensors] | None = None  # (the rows' seq ids, tensors)

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.generators.pop(seq_id, None)

    def launch(self, logits: torch.Tensor, rows: list[SampleRow], greedy: torch.Tensor | None = None,
               grammar_bitmask: np.ndarray | None = None) -> "PendingSample":
        """Queues the sampling of one step on the device and the copy of its results to the host;
        returns without waiting for either. logits: [n, V] float32 (modified in place); greedy:
        their rows' argmax when the caller has it (written in place); grammar_bitmask: int32
        [n, ceil(V / 32)], the tokens each row's grammar allows (masked before sampling, as vLLM
        does, so those rows' logprobs are of the constrained distribution)."""
        if grammar_bitmask is not None:
            apply_bitmask_(logits, torch.from_numpy(grammar_bitmask))
            greedy = None
        st = self._sampling_tensors(rows, logits.shape[1])
        out = sample(logits, st, greedy)
        if out.sampled_logprob is None:
            results = out.token_ids
        else:
            parts = [out.token_ids.double(), out.sampled_logprob.double(), out.sampled_rank.double()]
            if out.top_ids is not None:
                parts += [out.top_ids.double().flatten(), out.top_logprobs.double().flatten()]
            results = torch.cat(parts)
        # NOTE: the one device->host copy of the step (into pinned memory on a GPU).
        host = results.to("cpu", non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return PendingSample(rows, st.max_logprobs, out.token_ids, host, ready)

    def collect(self, pending: "PendingSample") -> list[SampledToken]:
        """Waits for a launched step's results (the step's one CPU-GPU synchronization)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        return self._to_host(pending.rows, pending.max_logprobs, pending.host.tolist())

    def _sampling_tensors(self, rows: list[SampleRow], vocab: int) -> SamplingTensors:
        """Per-request settings as tensors, built once per step (or the last step's, for the same rows:
        a sequence's settings never change, and sequence ids are never reused)."""
        seq_ids = [r.seq_id for r in rows]
        if self._reusable is not None and self._reusable[0] == seq_ids:
            return self._reusable[1]
        params = [r.settings for r in rows]
        temps = [p.temperature for p in params]
        greedy = [t == 0.0 or p.top_k == 1 for t, p in zip(temps, params)]
        all_greedy = all(greedy)
        st = SamplingTensors(
            temperature=None if all_greedy else self._to_device([t if t > 0 else 1.0 for t in temps], torch.float32),
            random_rows=[i for i, g in enumerate(greedy) if not g],
            all_greedy=all_greedy,
            top_k=[max(p.top_k, 0) for p in params],
            top_p=None, min_p=None,
            generators=[self._generator(r) for r in rows] if not all_greedy else [None] * len(rows),
            default_generator=self.default_generator,
        )
        if any(p.top_p < 1.0 for p in params):
            st.top_p = self._to_device([p.top_p for p in params], torch.float32)
        if any(p.min_p > 0.0 for p in params):
            st.min_p = self._to_device([p.min_p for p in params], torch.float32)
        self._penalties(st, rows, params, vocab)
        self._banned(st, rows, params, vocab)
        self._bias(st, params)
        self._allowed(st, params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            st.logprob_rows = self._to_device(want, torch.long)
            st.max_logprobs = max(params[i].logprobs for i in want)
        step_dependent = st.output_counts is not None or any(p.min_tokens > 0 for p in params)
        self._reusable = None if step_dependent else (seq_ids, st)
        return st

    def _generator(self, row: SampleRow) -> torch.Generator | None:
        seed = row.settings.seed
        if seed is None:
            return None
        g = self.generators.get(row.seq_id)
        if g is None:
            # Sample k of a seeded request gets its own stream, so the n samples differ.
            sample_seed = seed if row.sample_index == 0 else hash((seed, row.sample_index)) & (2**63 - 1)
            g = self.generators[row.seq_id] = torch.Generator(device=self.device).manual_seed(sample_seed)
        return g

    def _penalties(self, st: SamplingTensors, rows: list[SampleRow], params, vocab: int) -> None:
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_freq = any(p.frequency_penalty != 0.0 for p in params)
        use_pres = any(p.presence_penalty != 0.0 for p in params)
        if not (use_rep or use_freq or use_pres):
            return
        dev, n = self.device, len(rows)
        # Token statistics via one scatter over padded id lists; the pad id `vocab` lands in a spare column.
        def counts(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(x) for x in lists))
            idx = self._to_device([x + [vocab] * (width - len(x)) for x in lists], torch.long)
            out = torch.zeros(n, vocab + 1, dtype=torch.float32, device=dev)
            out.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=dev))
            return out[:, :vocab]

        st.output_counts = counts([r.output_token_ids or [] for r in rows])
        if use_rep:
            prompt_seen = counts([r.prompt_token_ids or [] for r in rows]) > 0
            st.seen_mask = prompt_seen | (st.output_counts > 0)
            st.repetition = self._to_device([p.repetition_penalty for p in params], torch.float32)
        if use_freq:
            st.frequency = self._to_device([p.frequency_penalty for p in params], torch.float32)
        if use_pres:
            st.presence = self._to_device([p.presence_penalty for p in params], torch.float32)

    def _banned(self, st: SamplingTensors, rows: list[SampleRow], params, vocab: int) -> None:
        """Stop tokens a row may not sample before its min_tokens, as (row, token id) pairs."""
        banned_rows, tokens = [], []
        for i, (r, p) in enumerate(zip(rows, params)):
            if r.num_output_tokens < p.min_tokens:
                stops = [t for t in list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids) if t < vocab]
                banned_rows += [i] * len(stops)
                tokens += stops
        if banned_rows:
            st.banned = (self._to_device(banned_rows, torch.long), self._to_device(tokens, torch.long))

    def _bias(self, st: SamplingTensors, params) -> None:
        """Each row's logit_bias as (row, token id, value) triples (the engine checked the ids)."""
        rows, tokens, values = [], [], []
        for i, p in enumerate(params):
            for token, value in p.logit_bias:
                rows.append(i)
                tokens.append(token)
                values.append(value)
        if rows:
            st.bias = (self._to_device(rows, torch.long), self._to_device(tokens, torch.long),
                       self._to_device(values, torch.float32))

    def _allowed(self, st: SamplingTensors, params) -> None:
        """The rows restricted to allowed_token_ids, with their (row in that subset, allowed id) pairs."""
        rows, entry_rows, tokens = [], [], []
        for i, p in enumerate(params):
            if p.allowed_token_ids:
                entry_rows += [len(rows)] * len(p.allowed_token_ids)
                tokens += p.allowed_token_ids
                rows.append(i)
        if rows:
            st.allowed = (self._to_device(rows, torch.long), self._to_device(entry_rows, torch.long),
                          self._to_device(tokens, torch.long))

    def _to_host(self, rows: list[SampleRow], k: int, host: list[float]) -> list[SampledToken]:
        """host: token ids [n], then for the m rows that want logprobs: logprobs [m], ranks [m],
        top ids [m * k], top logprobs [m * k]."""
        n = len(rows)
        sampled = [SampledToken(r.seq_id, int(t)) for r, t in zip(rows, host[:n])]
        if len(host) > n:
            wanting = [i for i, r in enumerate(rows) if r.settings.logprobs is not None]
            m = len(wanting)
            lps, ranks = host[n : n + m], host[n + m : n + 2 * m]
            top_ids = host[n + 2 * m : n + 2 * m + m * k]
            top_lps = host[n + 2 * m + m * k :]
            for j, row in enumerate(wanting):
                tok = sampled[row]
                want = rows[row].settings.logprobs
                tok.logprob, tok.rank = lps[j], int(ranks[j])
                tok.top = [(int(top_ids[j * k + r]), top_lps[j * k + r]) for r in range(want)]
        return sampled
