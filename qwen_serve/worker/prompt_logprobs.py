"""Prompt logprobs: how likely the model found each prompt token, from the rows of a prompt chunk.

Row j of a chunk (position p = start + j) predicts token p + 1, so a chunk yields entries for the
prompt tokens start + 1 .. start + n; the row at the prompt's last position predicts no prompt token
(it samples the first output token) and the prompt's first token has no row at all. Chunked prefill
therefore gives the same entries as one chunk. Rows of a recomputed (preempted) prompt give the same
entries again; the output processor keeps the first copy.

Logits cover the whole vocabulary for every row, so they are computed `ROWS_PER_SLICE` rows at a time:
an 8K-token chunk of a 152K vocabulary would otherwise need 5 GB of float32 logits at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwen_serve.engine.request import Sequence
from qwen_serve.engine.scheduler import ScheduledChunk

ROWS_PER_SLICE = 512


@dataclass(slots=True)
class PromptLogprobs:
    """One chunk's entries: entry i is for prompt token `first + i` (predicted by the row before it)."""

    seq: Sequence
    first: int
    logprobs: list[float]  # of the prompt token
    ranks: list[int]  # of the prompt token, 1 = most likely
    top: list[list[tuple[int, float]]]  # the top-k alternatives (token id, logprob), best first


def _prompt_rows(chunk: ScheduledChunk) -> int:
    """How many of the chunk's rows predict a prompt token (0 when its request did not ask)."""
    seq = chunk.seq
    # Forked samples share the first sample's prompt, whose entries are already recorded.
    if seq.request.params.prompt_logprobs is None or seq.sample_index != 0:
        return 0
    return max(0, min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1) - chunk.start)


def wants_prompt_logprobs(chunks: list[ScheduledChunk]) -> bool:
    """Whether any chunk of the step needs its rows' logits for prompt logprobs."""
    return any(_prompt_rows(c) > 0 for c in chunks)


@dataclass(slots=True)
class PendingPromptLogprobs:
    """One step's prompt logprobs, queued on the device: `host` fills once `ready` (a CUDA event; None
    on the CPU) has passed, so launching the step never waits for them."""

    wanted: list[tuple[int, ScheduledChunk, int]]  # (chunk index, chunk, rows that predict a prompt token)
    k: int  # top alternatives per row: the most any of the step's requests asked for
    host: torch.Tensor  # float64: logprobs [R], ranks [R], top ids [R * k], top logprobs [R * k]
    ready: torch.cuda.Event | None

    def collect(self) -> list[PromptLogprobs]:
        """Waits for the copy and returns one entry list per chunk."""
        if self.ready is not None:
            self.ready.synchronize()
        return _entries(self.wanted, self.host.tolist(), self.k)


def launch_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, chunks: list[ScheduledChunk],
                           query_start: list[int], to_device: Callable[[list, torch.dtype], torch.Tensor]
                           ) -> PendingPromptLogprobs | None:
    """Queues the entries of every chunk whose request asked for prompt logprobs (None: no chunk did).

    hidden: [num_tokens, hidden_size], chunk i owning rows query_start[i]:query_start[i + 1];
    to_device: host list -> device tensor without waiting for the GPU (the runner's).
    """
    wanted = [(i, c, n) for i, c in enumerate(chunks) if (n := _prompt_rows(c)) > 0]
    if not wanted:
        return None
    rows: list[int] = []
    targets: list[int] = []
    for i, c, n in wanted:
        rows.extend(range(query_start[i], query_start[i] + n))
        targets.extend(c.seq.token_ids[c.start + 1 : c.start + 1 + n])
    k = max(c.seq.request.params.prompt_logprobs for _, c, _ in wanted)
    rows_t = to_device(rows, torch.long)  # [R]
    targets_t = to_device(targets, torch.long)[:, None]  # [R, 1]
    token_lp, ranks, top_lp, top_ids = [], [], [], []
    for s in range(0, len(rows), ROWS_PER_SLICE):
        logits = model.compute_logits(hidden[rows_t[s : s + ROWS_PER_SLICE]])  # [r, V] float32
        logprobs = torch.log_softmax(logits, dim=-1)
        del logits  # frees one [r, V] before the comparisons below allocate theirs
        chosen = logprobs.gather(1, targets_t[s : s + ROWS_PER_SLICE])  # [r, 1]
        token_lp.append(chosen.squeeze(1))
        ranks.append((logprobs > chosen).sum(dim=1) + 1)
        if k > 0:
            values, ids = logprobs.topk(k, dim=-1)  # [r, k]
            top_lp.append(values)
            top_ids.append(ids)
    parts = [torch.cat(token_lp).double(), torch.cat(ranks).double()]
    if k > 0:
        parts += [torch.cat(top_ids).double().flatten(), torch.cat(top_lp).double().flatten()]
    # NOTE: one device->host copy for all prompt chunks of the step (into pinned memory on a GPU).
    host = torch.cat(parts).to("cpu", non_blocking=True)
    ready = None
    if hidden.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return PendingPromptLogprobs(wanted, k, host, ready)


def _entries(wanted: list[tuple[int, ScheduledChunk, int]], host: list[float], k: int) -> list[PromptLogprobs]:
    total = sum(n for _, _, n in wanted)
    lps, rks = host[:total], host[total : 2 * total]
    ids, tops = host[2 * total : 2 * total + total * k], host[2 * total + total * k :]
    out = []
    row = 0
    for _, c, n in wanted:
        want = c.seq.request.params.prompt_logprobs
        top = [[(int(ids[(row + j) * k + r]), tops[(row + j) * k + r]) for r in range(want)] for j in range(n)]
        out.append(PromptLogprobs(c.seq, c.start + 1, lps[row : row + n], [int(x) for x in rks[row : row + n]], top))
        row += n
    return out
