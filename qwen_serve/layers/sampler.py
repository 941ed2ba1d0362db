"""Batched sampling: one call turns a step's logits into next tokens (and logprobs) for every row.

Per-request settings arrive as tensors built once per step (`SamplingTensors`, by the runner),
so nothing here loops over the vocabulary in Python. Order, as in vLLM: logprobs of the raw
model distribution, then allowed_token_ids, logit_bias, disallowed-token masks, penalties, greedy argmax or
temperature -> top_k -> top_p -> min_p -> a draw.

The draw is an exponential race (argmax of p / q with q ~ Exp(1), as in gpt-fast): it needs no
normalisation and no device->host sync. A request with a seed owns a torch.Generator and draws its
own noise in an order that depends only on its own row (by rank for top_k, by token id
otherwise), so its text does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SamplingTensors:
    """One step's sampling settings, one row per sampling sequence. Optional parts are None when no row uses them."""

    temperature: torch.Tensor | None  # [n] float32 (greedy rows 1.0); None when every row is greedy
    random_rows: list[int]  # rows that draw (the others take the argmax); a host list, so no sync
    all_greedy: bool
    top_k: list[int]  # per row, 0 = off (host side: chooses the candidate set)
    top_p: torch.Tensor | None  # [n] float32, 1 = off
    min_p: torch.Tensor | None  # [n] float32, 0 = off
    generators: list[torch.Generator | None]  # per row; None: the shared generator
    default_generator: torch.Generator | None
    # Penalties: [n] float32 each plus token statistics.
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None  # [n, V] float32: times each token was generated
    seen_mask: torch.Tensor | None = None  # [n, V] bool: token in prompt or output
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [b], token ids [b]): not allowed this step
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows [k], token ids [k], float32 [k]): logit_bias
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows [r], entries' rows [a], token ids [a])
    logprob_rows: torch.Tensor | None = None  # [m] int64 rows that want logprobs
    max_logprobs: int = 0


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [n] int64
    # For the rows in SamplingTensors.logprob_rows (None otherwise):
    sampled_logprob: torch.Tensor | None = None  # [m] float32
    sampled_rank: torch.Tensor | None = None  # [m] int64, 1 = most likely
    top_ids: torch.Tensor | None = None  # [m, max_logprobs] int64
    top_logprobs: torch.Tensor | None = None  # [m, max_logprobs] float32


def sample(logits: torch.Tensor, st: SamplingTensors, argmax: torch.Tensor | None = None) -> SamplerOutput:
    """logits: [n, V] float32 (modified in place); argmax: [n] their rows' argmax when the caller
    already has it (the decode CUDA graph computes it), used unless allowed ids, biases, bans or
    penalties change the logits; the drawn rows are written into it."""
    raw_logprobs = None
    if st.logprob_rows is not None:
        raw_logprobs = torch.log_softmax(logits[st.logprob_rows], dim=-1)  # [m, V]
    if st.allowed is not None:
        # Everything but the allowed ids of the restricted rows goes to -inf: entry j of the lists is
        # (row in the restricted subset, allowed id).
        rows, entry_rows, ids = st.allowed
        blocked = torch.ones(rows.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
        blocked[entry_rows, ids] = False
        logits[rows] = logits[rows].masked_fill_(blocked, float("-inf"))
    if st.bias is not None:
        rows, ids, values = st.bias  # one entry per (row, token): a gather and a scatter, no accumulation
        logits[rows, ids] = logits[rows, ids] + values
    if st.banned is not None:
        logits[st.banned] = float("-inf")
    changed = st.allowed is not None or st.bias is not None or st.banned is not None
    if _apply_penalties(logits, st) or changed:
        argmax = None

    # [n] greedy choice for every row (cheap next to the forward pass)
    tokens = logits.argmax(dim=-1) if argmax is None else argmax
    if not st.all_greedy:
        rows = torch.tensor(st.random_rows).to(logits.device, non_blocking=True)  # [r]
        tokens[rows] = _draw(logits[rows], st, st.random_rows, rows)

    out = SamplerOutput(tokens)
    if raw_logprobs is not None:
        sampled = tokens[st.logprob_rows].unsqueeze(1)  # [m, 1]
        chosen = raw_logprobs.gather(1, sampled)  # [m, 1]
        out.sampled_logprob = chosen.squeeze(1)
        out.sampled_rank = (raw_logprobs > chosen).sum(dim=1) + 1
        if st.max_logprobs > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(st.max_logprobs, dim=-1)
    return out


def _apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> bool:
    """Returns whether any penalty applied."""
    if st.repetition is not None:
        # HF / vLLM rule: divide positive logits, multiply negative ones, for every token seen.
        rep = st.repetition[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(st.seen_mask, penalised, logits))
    if st.frequency is not None:
        logits -= st.frequency[:, None] * st.output_counts
    if st.presence is not None:
        logits -= st.presence[:, None] * (st.output_counts > 0).float()
    return st.repetition is not None or st.frequency is not None or st.presence is not None


def _draw(logits: torch.Tensor, st: SamplingTensors, rows: list[int], rows_t: torch.Tensor) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p and the random draw for the non-greedy rows. logits: [r, V];
    rows: their row numbers, as a host list (per-row settings) and on the device (indexing there
    with a host list would copy it synchronously)."""
    r, vocab = logits.shape
    logits = logits / st.temperature[rows_t][:, None]
    top_k = [st.top_k[i] for i in rows]
    top_p = st.top_p[rows_t] if st.top_p is not None else None
    needs_sorted = top_p is not None or any(k > 0 for k in top_k)
    if needs_sorted:
        # Candidates in descending order: only the top max(k) when every row has a top_k
        # (a partial sort of a 152K vocab is far cheaper than a full one), else the whole vocab.
        k_max = max(top_k) if all(k > 0 for k in top_k) else vocab
        cand_logits, cand_ids = logits.topk(min(k_max, vocab), dim=-1)  # [r, K] sorted
        ranks = torch.arange(cand_logits.shape[1], device=logits.device)
        limits = torch.tensor([k if k > 0 else vocab for k in top_k]).to(logits.device, non_blocking=True)
        cand_logits.masked_fill_(ranks[None, :] >= limits[:, None], float("-inf"))
    else:
        cand_logits, cand_ids = logits, None
    probs = torch.softmax(cand_logits, dim=-1)  # [r, K]
    if top_p is not None:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before > top_p[:, None], 0.0)
    if st.min_p is not None:
        min_p = st.min_p[rows_t][:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)

    noise = torch.empty_like(probs).exponential_(generator=st.default_generator)  # [r, K]
    for j, i in enumerate(rows):
        g = st.generators[i]
        if g is None:
            continue
        if top_k[j] > 0:  # its own noise, by rank: the same whatever the other rows ask for
            noise[j, : top_k[j]] = torch.empty(top_k[j], device=probs.device).exponential_(generator=g)
        else:  # by token id, then into this step's candidate order
            own = torch.empty(vocab, device=probs.device).exponential_(generator=g)
            noise[j] = own if cand_ids is None else own[cand_ids[j]]
    choice = (probs / noise).argmax(dim=-1)  # [r]
    return choice if cand_ids is None else cand_ids.gather(1, choice[:, None]).squeeze(1)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits of disallowed ids to -inf in place. logits [B, V] (any device), bitmask int32 [B, >= V/32] (CPU).

    On a GPU: one host->device copy of B*V/8 bytes (19 KB per row at V = 151,936), then the bits are expanded
    on the device: [B, W] -> [B, W, 32] -> [B, W*32], cut to V. bitmask must stay untouched until the copy ends.
    """
    if bitmask.shape[0] != logits.shape[0] or bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
    vocab = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # numpy unpacks [B, 4W] bytes LSB-first in one pass and fills in place: ~55 us per row at V = 151,936,
        # where torch's CPU masked_fill_ measured ~800 us per row on the dev machine.
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # [B, V]
        np.copyto(logits.numpy(), -np.inf, where=~allowed.view(np.bool_))
        return
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    disallowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab] == 0  # [B, V]
    logits.masked_fill_(disallowed, float("-inf"))
