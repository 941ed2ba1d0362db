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

from qwen_serve.worker.step_input import ChunkInput, PromptLogprobs

ROWS_PER_SLICE = 512


def wants_prompt_logprobs(chunks: list[ChunkInput]) -> bool:
    """Whether any chunk of the step needs its rows' logits for prompt logprobs."""
    return any(c.prompt_rows > 0 for c in chunks)


@dataclass(slots=True)
class PendingPromptLogprobs:
    """One step's prompt logprobs, queued on the device: `host` fills once `ready` (a CUDA event; None
    on the CPU) has passed, so launching the step never waits for them."""

    wanted: list[tuple[int, ChunkInput]]  # (chunk index, chunk) of the chunks that asked
    k: int  # top alternatives per row: the most any of the step's requests asked for
    host: torch.Tensor  # float64: logprobs [R], ranks [R], top ids [R * k], top logprobs [R * k]
    ready: torch.cuda.Event | None

    def collect(self) -> list[PromptLogprobs]:
        """Waits for the copy and returns one entry list per chunk."""
        if self.ready is not None:
            self.ready.synchronize()
        return _entries(self.wanted, self.host.tolist(), self.k)


def launch_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, chunks: list[ChunkInput],
                           query_start: list[int], to_device: Callable[[list, torch.dtype], torch.Tensor]
                           ) -> PendingPromptLogprobs | None:
    """Queues the entries of every chunk whose request asked for prompt logprobs (None: no chunk did).

    hidden: [num_tokens, hidden_size], chunk i owning rows query_start[i]:query_start[i + 1];
    to_device: host list -> device tensor without waiting for the GPU (the runner's).
    """
    wanted = [(i, c) for i, c in enumerate(chunks) if c.prompt_rows > 0]
    if not wanted:
        return None
    rows: list[int] = []
    targets: list[int] = []
    for i, c in wanted:
        rows.extend(range(query_start[i], query_start[i] + c.prompt_rows))
        targets.extend(c.prompt_targets)
    k = max(c.prompt_top_k for _, c in wanted)
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


def _entries(wanted: list[tuple[int, ChunkInput]], host: list[float], k: int) -> list[PromptLogprobs]:
    total = sum(c.prompt_rows for _, c in wanted)
    lps, rks = host[:total], host[total : 2 * total]
    ids, tops = host[2 * total : 2 * total + total * k], host[2 * total + total * k :]
    out = []
    row = 0
    for _, c in wanted:
        n, want = c.prompt_rows, c.prompt_top_k
        top = [[(int(ids[(row + j) * k + r]), tops[(row + j) * k + r]) for r in range(want)] for j in range(n)]
        out.append(PromptLogprobs(c.seq_id, c.start + 1, lps[row : row + n], [int(x) for x in rks[row : row + n]], top))
        row += n
    return out
