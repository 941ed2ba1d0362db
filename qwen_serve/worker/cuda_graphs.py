"""CUDA graphs for decode and verify steps: one graph per (batch-size bucket, tokens per sequence), all
sharing one memory pool.

A decode step of a few sequences launches hundreds of small kernels; replaying a captured graph
removes their per-launch host cost. Every graph reads static buffers that `run` fills before each
replay (token ids, positions, KV slots, block tables, sequence lengths) and writes two static
outputs: every row's float32 logits and their argmax (the greedy token, which the sampler takes
as is when nothing changes the logits). A batch of n sequences replays the smallest bucket >= n;
rows n..bucket are padding: slot -1 (the KV write skips it), position 0, and whatever token id an
earlier replay left there.

Verify steps of speculative decoding (each sequence's last token and its drafts, `q` = 2..max_query
tokens) have graphs of their own for the batches speculation runs at (up to `verify_max_seqs`): without
them the step ran eagerly at 3.4x a decode step's time for one draft (BENCHMARKS.md, run 40). Every sequence
of such a step is laid out over q rows; a sequence with fewer tokens is padded after its last one
(slot -1; those rows' outputs are never read), and its length counts the padding, so that its real rows
keep their positions and causal masks. Their attention runs one program per query token with split-KV,
as decode does (AttentionMetadata.per_token_queries).

Captured after the KV cache is bound, with meta.max_seq_len = max_model_len: the Triton backend picks
its split-KV count on the host from max_seq_len at capture time and reads the real lengths on the
device at every replay (docs/gpu-notes.md). Only the Triton backend is capturable (the torch reference
builds tensors from host lists), so the runner creates this only when that backend is bound.
Prefill and mixed steps stay eager; EngineConfig.enforce_eager turns graphs off.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from qwen_serve.layers.attention import AttentionMetadata, forward_context
from qwen_serve.worker.host_arrays import host_tensor

log = logging.getLogger(__name__)


class DecodeOutput(NamedTuple):
    """Views of the graphs' static outputs for the n rows of one replay: valid until the next replay."""

    logits: torch.Tensor  # [n, vocab] float32
    greedy: torch.Tensor  # [n] int64: each row's argmax


class PaddedStep(NamedTuple):
    """A step's sequences laid out over q rows each."""

    positions: list[int]  # [n * q]
    slots: list[int]  # [n * q]; -1 on padding rows
    seq_lens: list[int]  # [n]: each sequence's cached tokens + q
    rows: list[int]  # each real input's row in the layout


def pad_to_query_len(starts: list[int], query_start: list[int], positions: list[int], slots: list[int],
                     q: int) -> PaddedStep:
    """Sequence i's inputs query_start[i]:query_start[i + 1] (its cached tokens: starts[i]) at rows q * i on,
    then padding up to q rows: no KV write, its last position repeated (any in-range value would do: those
    rows are never read), and a length that counts the padding, so the real rows keep their positions and
    causal masks."""
    padded_pos, padded_slots, rows = [], [], []
    for i in range(len(starts)):
        s, e = query_start[i], query_start[i + 1]
        rows.extend(range(i * q, i * q + e - s))
        padded_pos += positions[s:e] + positions[e - 1:e] * (q - (e - s))
        padded_slots += slots[s:e] + [-1] * (q - (e - s))
    return PaddedStep(padded_pos, padded_slots, [start + q for start in starts], rows)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 below max_num_seqs, then max_num_seqs itself."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return sorted(set(small + list(range(16, max_num_seqs, 16)) + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model: nn.Module, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int, vocab_size: int, max_query: int = 1, verify_max_seqs: int = 0) -> None:
        self.model = model
        self.device = device
        self.buckets = batch_buckets(max_num_seqs)
        # Verify steps: q = 2..max_query tokens a sequence, batches up to verify_max_seqs.
        verifies = max_query > 1 and verify_max_seqs > 0
        self.verify_buckets = batch_buckets(min(verify_max_seqs, max_num_seqs)) if verifies else []
        self.max_query = max_query if self.verify_buckets else 1
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        b = self.buckets[-1]
        rows = max(b, self.verify_buckets[-1] * self.max_query if self.verify_buckets else 0)
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)  # [R]
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # [R]
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)  # [R]; -1 = no KV write
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)  # [B]
        # [B, max_blocks]: rows are overwritten up to each step's width; stale entries past a
        # sequence's length are never read, and padding rows read only their first entries (valid ids).
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=device)
        # q tokens a sequence: sequence i's rows start at q * i.
        self.query_start_loc = {q: torch.arange(0, q * b + 1, q, dtype=torch.int32, device=device)
                                for q in range(1, self.max_query + 1)}
        self.logits = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)  # [R, V] graph output
        self.greedy = torch.zeros(rows, dtype=torch.long, device=device)  # [R] graph output
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (bucket, q) -> graph

    def _meta(self, n: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=list(range(0, n * q + 1, q)), seq_lens=[q] * n, slot_mapping=self.slot_mapping[: n * q],
            block_tables=self.block_tables[:n], max_query_len=q, max_seq_len=self.max_model_len,
            query_start_loc_t=self.query_start_loc[q][: n + 1], seq_lens_t=self.seq_lens[:n],
            per_token_queries=True,
        )

    def _forward(self, n: int, q: int) -> None:
        rows = n * q
        with forward_context(self._meta(n, q)):
            hidden = self.model(self.input_ids[:rows], self.positions[:rows])
        self.model.compute_logits(hidden, out=self.logits[:rows])
        torch.argmax(self.logits[:rows], dim=-1, out=self.greedy[:rows])

    @torch.inference_mode()
    def capture(self) -> None:
        """Most rows first, so the smaller graphs fit in the pool it leaves. The static inputs hold
        padding values (slot -1) throughout, so neither warm-up nor capture touches the cache."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        shapes = [(n, 1) for n in self.buckets]
        shapes += [(n, q) for n in self.verify_buckets for q in range(2, self.max_query + 1)]
        for n, q in sorted(shapes, key=lambda s: (-s[0] * s[1], -s[1])):
            self.seq_lens.fill_(q)  # each padding sequence: its q tokens and no cached ones
            # Warm-up outside the graph, on a side stream: Triton compiles and lazy allocations happen here.
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(n, q)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(n, q)
            self.graphs[n, q] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs (decode: batch sizes %s; verify: batch sizes %s x 2..%d tokens) in %.1f s",
                 len(self.graphs), self.buckets, self.verify_buckets, self.max_query, time.perf_counter() - start)

    def fits(self, num_seqs: int, width: int, q: int = 1, longest: int = 0) -> bool:
        """Whether a step of num_seqs sequences of q tokens (block tables `width` wide; padded, the
        longest reaches position `longest` - 1) has a graph."""
        if q == 1:
            return num_seqs <= self.buckets[-1] and width <= self.max_blocks
        return (q <= self.max_query and bool(self.verify_buckets) and num_seqs <= self.verify_buckets[-1]
                and width <= self.max_blocks and longest <= self.max_model_len)

    def run(self, ids: torch.Tensor, positions: list[int], slots: list[int], seq_lens: list[int],
            tables: np.ndarray, q: int = 1, rows: torch.Tensor | None = None) -> DecodeOutput:
        """One step of n sequences of q tokens each -> the logits and greedy tokens of its n * q rows
        (views of the static outputs: queue their use before the next replay). positions and slots are
        laid out q a sequence (padded); ids [num_tokens] on the device are the real tokens, which go to
        `rows` (device int64 [num_tokens]) of that layout (all of them when None); tables int32 [n, width]."""
        n = len(seq_lens)
        bucket = next(b for b in (self.buckets if q == 1 else self.verify_buckets) if b >= n)
        pad = (bucket - n) * q
        # Padding rows keep whatever ids an earlier replay left: any valid id will do, since they
        # write no KV (slot -1) and their outputs are never read.
        if rows is None:
            self.input_ids[: n * q].copy_(ids)
        else:
            self.input_ids.index_copy_(0, rows, ids)
        # Host -> device through pinned memory, queued on the stream before the replay.
        self._fill(self.positions[: bucket * q], positions + [0] * pad, torch.long)
        self._fill(self.slot_mapping[: bucket * q], slots + [-1] * pad, torch.long)
        self._fill(self.seq_lens[:bucket], seq_lens + [q] * (bucket - n), torch.int32)
        self._fill(self.block_tables[:n, : tables.shape[1]], tables, torch.int32)
        self.graphs[bucket, q].replay()
        return DecodeOutput(self.logits[: n * q], self.greedy[: n * q])

    @staticmethod
    def _fill(dst: torch.Tensor, values: list | np.ndarray, dtype: torch.dtype) -> None:
        dst.copy_(host_tensor(values, dtype).pin_memory(), non_blocking=True)
