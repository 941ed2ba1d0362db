"""Decides what one step computes, under a token budget; pure Python (no torch).

As in vLLM v1 there is no prefill phase and no decode phase: each running sequence is
`num_tokens - num_computed_tokens` tokens behind, and a step gives each as many tokens as the
budget allows - one for a decode, a chunk for a prompt. Running sequences come first (oldest
first), then waiting ones are admitted while budget, `max_num_seqs` and free blocks last.
A sequence may be one token ahead of its `token_ids` (`num_pending_tokens`): with overlapped steps
the engine schedules step N+1 while step N's sampled tokens are still on the device, and the runner
reads such a token from there.
With speculative decoding on for a step, a decoding sequence also gets the drafts its proposer finds
(engine/speculative.py): its chunk is its last token and the drafts, every row of which samples, and
the engine moves its computed count back past the drafts that were not accepted (`rollback`).
When a running sequence cannot get a block, the newest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later (its full blocks stay
in the prefix cache, so the recompute is often cheap).

`SchedulerOutput` is the typed contract with the model runner; the runner answers with sampled
tokens, and the engine appends them and tells the scheduler which sequences finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen_serve.engine.block_manager import BlockManager
from qwen_serve.engine.request import Request, Sequence, SequenceStatus
from qwen_serve.engine.speculative import Proposer


def drafts_allowed(seq: Sequence) -> bool:
    """Whether a sequence may be speculated: not with penalties, which count the tokens before each row."""
    p = seq.request.params
    return p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0


@dataclass(slots=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at position `start` (its computed count before the step)."""

    seq: Sequence
    start: int
    num_tokens: int
    # Sequences that sample their next token from this chunk's last row: [] for a prompt chunk
    # that does not reach the end; [seq, forked samples...] when a request with n > 1 forks.
    sample_seqs: list[Sequence]
    # Speculative drafts, the chunk's last tokens (not in seq.token_ids): each row from the sequence's
    # last token on samples.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        known = self.num_tokens - len(self.draft_token_ids)
        return self.seq.token_ids[self.start : self.start + known] + self.draft_token_ids


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): before the forward pass
    finished_seq_ids: list[int] = field(default_factory=list)  # gone since the last step: drop their state
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None, proposer: Proposer | None = None) -> None:
        self.bm = block_manager
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.extend(request.sequences)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, speculate: bool = False) -> SchedulerOutput:
        """One step's chunks; with `speculate`, decoding sequences get drafts where their proposer finds some."""
        budget = self.max_num_batched_tokens
        out = SchedulerOutput([], finished_seq_ids=self._finished_ids)
        self._finished_ids = []

        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens_with_pending - seq.num_computed_tokens, budget)
            # 0: a sample forked this step (it samples from its parent's row), or a sequence whose
            # token still on the device is certain to finish it.
            if num_new == 0 or seq.ends_with_pending(self.max_model_len):
                i += 1
                continue
            drafts = self._drafts(seq, budget) if speculate and num_new == 1 else []
            num_new += len(drafts)
            copies = self.bm.allocate_slots(seq, num_new)
            while copies is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                copies = self.bm.allocate_slots(seq, num_new)
            if copies is None:
                break
            out.block_copies.extend(copies)
            self._schedule_chunk(out, seq, num_new, drafts)
            budget -= num_new
            i += 1

        # 2. Waiting sequences, in order, unless this step already had to preempt.
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            request = seq.request
            seats = request.n - len(request.sequences) + 1 if request.needs_fork else 1
            if len(self.running) + seats > self.max_num_seqs:
                break
            # A request asking for prompt logprobs computes every prompt row, so takes no cached blocks.
            wants_prompt_rows = getattr(seq.request.params, "prompt_logprobs", None) is not None
            cached = self.bm.find_cached_blocks(seq) if not seq.block_ids and not wants_prompt_rows else []
            start = len(cached) * self.bm.block_size if cached else seq.num_computed_tokens
            num_new = min(seq.num_tokens - start, budget)
            copies = self.bm.allocate_slots(seq, num_new, cached)
            if copies is None:
                break
            self.waiting.popleft()
            if cached or seq.num_computed_tokens == 0:
                self.bm.record_lookup(seq.num_tokens, start if cached else 0)
            if seq.num_preemptions == 0 and seq.sample_index == 0:
                seq.num_cached_tokens = start
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.block_copies.extend(copies)
            self._schedule_chunk(out, seq, num_new)
            budget -= num_new
        return out

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Drafts for a sequence one known token behind, within the step's budget, its max_tokens and the
        context, and that its grammar allows; none where rows cannot be sampled independently (penalties)."""
        p = seq.request.params
        if self.proposer is None or seq.num_pending_tokens or not drafts_allowed(seq):
            return []
        room = budget - 1  # a step adds up to drafts + 1 tokens; all must fit
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - seq.num_output_tokens - 1)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - seq.num_tokens - 1)
        drafts = self.proposer.propose(seq.token_ids, room)
        if seq.constraint is None or not drafts:
            return drafts
        if seq.constraint_waits_for is not None:  # thinking: unconstrained up to (not past) the end of thinking
            end = seq.constraint_waits_for
            return drafts[: drafts.index(end)] if end in drafts else drafts
        return drafts[: seq.constraint.valid_prefix(drafts)]

    def rollback(self, seq: Sequence, num_rejected: int) -> None:
        """`num_rejected` drafts of `seq`'s last step were not accepted: their KV entries are garbage that
        the next step overwrites (its blocks stay; no hash ever covered a draft)."""
        seq.num_computed_tokens -= num_rejected

    def _schedule_chunk(self, out: SchedulerOutput, seq: Sequence, num_new: int, drafts: list[int] = ()) -> None:
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_new
        samples: list[Sequence] = []
        if seq.num_computed_tokens == seq.num_tokens_with_pending + len(drafts):
            samples = [seq]
            request = seq.request
            if request.needs_fork and seq is request.sequences[0]:
                # The prompt is computed: the other samples share its blocks and sample from its row.
                for k in range(len(request.sequences), request.n):
                    child = seq.fork(k)
                    self.bm.fork(seq, child)
                    request.sequences.append(child)
                    self.running.append(child)
                    samples.append(child)
        out.chunks.append(ScheduledChunk(seq, start, num_new, samples, list(drafts)))

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish_sequence(self, seq: Sequence) -> None:
        """Frees a finished or aborted sequence's blocks, wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            self.bm.free_sequence(seq)
            seq.status = SequenceStatus.FINISHED
            self._finished_ids.append(seq.seq_id)

    def finish_request(self, request: Request) -> None:
        request.n = len(request.sequences)  # an aborted request forks no more samples
        for seq in request.sequences:
            self.finish_sequence(seq)
