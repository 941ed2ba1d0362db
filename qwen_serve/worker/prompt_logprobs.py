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


def compute_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, chunks: list[ScheduledChunk],
                            query_start: list[int]) -> list[PromptLogprobs]:
    """Entries for every chunk whose request asked for prompt logprobs.

    hidden: [num_tokens, hidden_size], chunk i owning rows query_start[i]:query_start[i + 1].
    """
    wanted = [(i, c, n) for i, c in enumerate(chunks) if (n := _prompt_rows(c)) > 0]
    if not wanted:
        return []
    rows: list[int] = []
    targets: list[int] = []
    for i, c, n in wanted:
        rows.extend(range(query_start[i], query_start[i] + n))
        targets.extend(c.seq.token_ids[c.start + 1 : c.start + 1 + n])
    k = max(c.seq.request.params.prompt_logprobs for _, c, _ in wanted)
    device = hidden.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)  # [R]
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)[:, None]  # [R, 1]
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
    return _to_host(wanted, token_lp, ranks, top_lp, top_ids, k)


def _to_host(wanted: list[tuple[int, ScheduledChunk, int]], token_lp: list[torch.Tensor], ranks: list[torch.Tensor],
             top_lp: list[torch.Tensor], top_ids: list[torch.Tensor], k: int) -> list[PromptLogprobs]:
    # NOTE: one device->host copy (a CPU-GPU synchronization) for all prompt chunks of the step.
    parts = [torch.cat(token_lp).double(), torch.cat(ranks).double()]
    if k > 0:
        parts += [torch.cat(top_ids).double().flatten(), torch.cat(top_lp).double().flatten()]
    host = torch.cat(parts).tolist()
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
