"""The scheduler's output as the workers' step input: live sequences in, plain data out.

The engine owns requests, sequences and their grammars; a worker (in this process or another) gets
by value what the step computes on: each chunk's tokens and block table, each sampling row's
settings and counts, and the bitmask of tokens each structured-output row may take next, filled
here because the grammar state lives in the engine (steps with grammars are never overlapped, so
the state is current when the step is built).
"""

from __future__ import annotations

import numpy as np
import torch

from qwen_serve.engine.request import Request, Sequence
from qwen_serve.engine.scheduler import ScheduledChunk, SchedulerOutput
from qwen_serve.worker.step_input import ChunkInput, SampleRow, SamplingSettings, StepInput


def sampling_settings(request: Request) -> SamplingSettings:
    """The request's settings as the worker reads them (made once per request, then reused)."""
    if request.settings is None:
        p = request.params
        request.settings = SamplingSettings(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty, seed=p.seed, min_tokens=p.min_tokens,
            stop_token_ids=tuple(p.stop_token_ids or ()), ignore_eos=p.ignore_eos,
            logit_bias=tuple((p.logit_bias or {}).items()), allowed_token_ids=tuple(p.allowed_token_ids or ()),
            logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs)
    return request.settings


def build_step_input(sched: SchedulerOutput, vocab_size: int) -> StepInput:
    chunks = []
    grammars: list[tuple[int, object, list[int]]] = []  # (first sample row, constraint, drafts it verifies)
    num_rows = 0
    for chunk in sched.chunks:
        seq = chunk.seq
        rows = []
        for s in chunk.sample_seqs:
            rows.append(_sample_row(s))
            if s.constraint is not None and s.constraint_waits_for is None:
                grammars.append((num_rows, s.constraint, chunk.draft_token_ids))
            num_rows += 1 + len(chunk.draft_token_ids)  # a drafted chunk samples each of its last rows
        item = ChunkInput(seq.seq_id, chunk.start, chunk.num_tokens, chunk.token_ids, seq.block_ids, rows,
                          num_draft_tokens=len(chunk.draft_token_ids))
        _add_prompt_rows(item, chunk)
        chunks.append(item)
    bitmask = _grammar_bitmask(grammars, num_rows, vocab_size) if grammars else None
    return StepInput(chunks, sched.block_copies, sched.finished_seq_ids, bitmask)


def _sample_row(seq: Sequence) -> SampleRow:
    settings = sampling_settings(seq.request)
    row = SampleRow(seq.seq_id, settings, seq.sample_index, seq.num_output_tokens + seq.num_pending_tokens)
    if settings.uses_penalties:
        row.prompt_token_ids = seq.token_ids[: seq.num_prompt_tokens]
        row.output_token_ids = seq.output_token_ids
    return row


def _add_prompt_rows(item: ChunkInput, chunk: ScheduledChunk) -> None:
    """How many of the chunk's rows predict a prompt token, when its request asked for prompt logprobs."""
    seq = chunk.seq
    k = seq.request.params.prompt_logprobs
    # Forked samples share the first sample's prompt, whose entries are already recorded.
    if k is None or seq.sample_index != 0:
        return
    n = max(0, min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1) - chunk.start)
    if n:
        item.prompt_rows, item.prompt_top_k = n, k
        item.prompt_targets = seq.token_ids[chunk.start + 1 : chunk.start + 1 + n]


def _grammar_bitmask(grammars: list[tuple[int, object, list[int]]], num_rows: int, vocab_size: int) -> np.ndarray:
    """int32 [num_rows, ceil(vocab / 32)]: every bit set for rows without a grammar; a grammar verifying
    speculative drafts fills its row and one more per draft, each with what is allowed after the drafts before."""
    bitmask = np.full((num_rows, (vocab_size + 31) // 32), -1, dtype=np.int32)
    view = torch.from_numpy(bitmask)  # shares the memory: llguidance writes through it
    if all(hasattr(c, "fill_bitmask") for _, c, _ in grammars):
        from qwen_serve.structured.constraint import fill_bitmasks

        fill_bitmasks([(c, row) for row, c, drafts in grammars if not drafts], view)
        for row, c, drafts in grammars:
            if drafts:
                c.fill_draft_bitmasks(drafts, view, row)
        return bitmask
    allowed = torch.zeros(bitmask.shape[1] * 32, dtype=torch.bool)
    for row, c, _ in grammars:  # constraints that only fill a bool row (never drafted: no valid_prefix)
        allowed.zero_()
        c.fill_mask(allowed)
        bitmask[row] = np.packbits(allowed.numpy(), bitorder="little").view(np.int32)
    return bitmask
