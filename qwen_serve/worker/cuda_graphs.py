"""CUDA graphs for decode-only steps: one graph per batch-size bucket, all sharing one memory pool.

A decode step of a few sequences launches hundreds of small kernels; replaying a captured graph
removes their per-launch host cost. Every graph reads static buffers that `run` fills before each
replay (token ids, positions, KV slots, block tables, sequence lengths) and writes two static
outputs: every row's float32 logits and their argmax (the greedy token, which the sampler takes
as is when nothing changes the logits). A batch of n sequences replays the smallest bucket >= n;
rows n..bucket are padding: slot -1 (the KV write skips it), sequence length 1, position 0, and
whatever token id an earlier replay left there.

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


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 below max_num_seqs, then max_num_seqs itself."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return sorted(set(small + list(range(16, max_num_seqs, 16)) + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model: nn.Module, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int, vocab_size: int) -> None:
        self.model = model
        self.device = device
        self.buckets = batch_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        b = self.buckets[-1]
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.positions = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)  # [B]; -1 = no KV write
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)  # [B]
        # [B, max_blocks]: rows are overwritten up to each step's width; stale entries past a
        # sequence's length are never read, and padding rows read only block entry 0 (a valid id).
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)  # one token per sequence
        self.logits = torch.zeros(b, vocab_size, dtype=torch.float32, device=device)  # [B, V] graph output
        self.greedy = torch.zeros(b, dtype=torch.long, device=device)  # [B] graph output
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=list(range(n + 1)), seq_lens=[1] * n, slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n], max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_t=self.query_start_loc[: n + 1], seq_lens_t=self.seq_lens[:n],
        )

    def _forward(self, n: int) -> None:
        with forward_context(self._meta(n)):
            hidden = self.model(self.input_ids[:n], self.positions[:n])
        self.model.compute_logits(hidden, out=self.logits[:n])
        torch.argmax(self.logits[:n], dim=-1, out=self.greedy[:n])

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so the smaller graphs fit in the pool it leaves. The static inputs
        hold padding values (slot -1) throughout, so neither warm-up nor capture touches the cache."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for n in reversed(self.buckets):
            # Warm-up outside the graph, on a side stream: Triton compiles and lazy allocations happen here.
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(n)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.buckets, time.perf_counter() - start)

    def fits(self, num_seqs: int, width: int) -> bool:
        return num_seqs <= self.buckets[-1] and width <= self.max_blocks

    def run(self, ids: torch.Tensor, positions: list[int], slots: list[int], seq_lens: list[int],
            tables: np.ndarray) -> DecodeOutput:
        """One decode step of n sequences (ids [n] on the device, one token each; tables int32 [n, width])
        -> their logits and greedy tokens (views of the static outputs: queue their use before the
        next replay)."""
        n = len(positions)
        bucket = next(b for b in self.buckets if b >= n)
        pad = bucket - n
        # Padding rows keep whatever ids an earlier replay left: any valid id will do, since they
        # write no KV (slot -1) and their outputs are never read.
        self.input_ids[:n].copy_(ids)
        # Host -> device through pinned memory, queued on the stream before the replay.
        self._fill(self.positions[:bucket], positions + [0] * pad, torch.long)
        self._fill(self.slot_mapping[:bucket], slots + [-1] * pad, torch.long)
        self._fill(self.seq_lens[:bucket], seq_lens + [1] * pad, torch.int32)
        self._fill(self.block_tables[:n, : tables.shape[1]], tables, torch.int32)
        self.graphs[bucket].replay()
        return DecodeOutput(self.logits[:n], self.greedy[:n])

    @staticmethod
    def _fill(dst: torch.Tensor, values: list | np.ndarray, dtype: torch.dtype) -> None:
        dst.copy_(host_tensor(values, dtype).pin_memory(), non_blocking=True)
