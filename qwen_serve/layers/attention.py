"""Attention over a paged KV cache, behind a small backend interface.

The model never sees batching: it calls `Attention.forward(positions, qkv)` on a flat batch of tokens,
and the per-step description of that batch (`AttentionMetadata`) travels beside it through
`forward_context`, a context manager that always resets, so metadata can never leak into the
next step. The runner binds each layer's slice of the preallocated KV cache with `bind_kv_cache`.

Cache layout per layer: `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is `block_id * block_size + offset`; `slot_mapping[i]` is where token i's key and
value are written, and a negative slot means "do not write" (padding in CUDA-graph batches).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwen_serve.kernels import cpu_attention
from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """One step's batch: sequences laid end to end, each with `query_len` new tokens.

    Sequence i owns query rows `query_start_loc[i]:query_start_loc[i+1]`; its new tokens are the
    last `query_len` of its `seq_len` tokens, so they attend to all cached tokens before them.
    """

    query_start_loc: list[int]  # [num_seqs + 1], host side
    seq_lens: list[int]  # [num_seqs] cached + new tokens, host side
    slot_mapping: torch.Tensor | None  # [num_tokens] int64 on the device; None: no cache (plain prefill)
    block_tables: torch.Tensor | None  # [num_seqs, max_blocks] int32 on the device
    max_query_len: int
    max_seq_len: int
    # Device copies for kernels that need them; filled by the runner (None on the torch path).
    query_start_loc_t: torch.Tensor | None = None  # [num_seqs + 1] int32
    seq_lens_t: torch.Tensor | None = None  # [num_seqs] int32
    # Decode batches may split each sequence's keys over several programs (flash-decoding). False keeps one
    # program per (sequence, KV head): the split count is a kernel constant, so eager calls with varying
    # batches would compile a kernel variant for each count they meet.
    split_kv: bool = True
    # Queries of several tokens computed as decode computes one: a program per query token (split-KV
    # allowed), each token's keys bounded by its position. For verify steps (a few short queries over
    # long contexts), which the CUDA graphs run; other steps take the tiled launch for queries > 1 token.
    per_token_queries: bool = False
    # Tensors the torch backend derives from the above, computed by the first layer that needs them
    # and reused by the others in the same forward pass (CPU only; see `_derived`).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def prefill_without_cache(cls, seq_lens: list[int]) -> "AttentionMetadata":
        """Whole sequences, no KV cache: what a plain forward pass over full prompts needs."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        longest = max(seq_lens) if seq_lens else 0
        return cls(starts, list(seq_lens), None, None, longest, longest)


@dataclass(frozen=True, slots=True)
class OutputRows:
    """The rows of a step whose outputs the caller reads (the last token of each chunk that samples).

    The model's last layer computes its attention output, MLP and final norm for these rows only, after
    writing every token's keys and values to the cache: nothing else reads that layer's other rows.
    `meta` describes a batch of just these rows, one query each over its sequence's whole context.
    """

    index: torch.Tensor  # [count] int64 rows of the step's flat batch
    meta: AttentionMetadata

    @property
    def count(self) -> int:
        return self.meta.num_seqs

    @classmethod
    def last_rows(cls, meta: AttentionMetadata, seqs: list[int], to_device) -> "OutputRows":
        """The last query row of each of meta's sequences `seqs` (increasing indices); `to_device` makes a
        device tensor from a host list without waiting for the device (the runner's)."""
        lens = [meta.seq_lens[i] for i in seqs]
        picked = to_device(seqs, torch.long)
        on_device = meta.query_start_loc_t is not None
        rows_meta = AttentionMetadata(
            query_start_loc=list(range(len(seqs) + 1)),
            seq_lens=lens,
            slot_mapping=None,  # their keys and values are already in the cache
            block_tables=meta.block_tables[picked],
            max_query_len=1,
            max_seq_len=max(lens, default=0),
            query_start_loc_t=to_device(list(range(len(seqs) + 1)), torch.int32) if on_device else None,
            seq_lens_t=meta.seq_lens_t[picked] if on_device else None,
            # Every prefill and mixed step makes one such batch of its own size: one kernel variant serves
            # them all (a single row over 131K tokens took 3.1 ms unsplit on the H100 in run 1, once per prompt).
            split_kv=False,
        )
        return cls(to_device([meta.query_start_loc[i + 1] - 1 for i in seqs], torch.long), rows_meta)


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Makes `metadata` visible to every attention layer for one forward pass, then clears it."""
    global _current
    previous, _current = _current, metadata
    try:
        yield metadata
    finally:
        _current = previous


def current_metadata(num_tokens: int) -> AttentionMetadata:
    """The metadata of the running forward pass; without one, the batch is one causal sequence."""
    if _current is None:
        return AttentionMetadata.prefill_without_cache([num_tokens])
    return _current


class AttentionBackend(Protocol):
    """Computes attention for a flat batch; k_cache/v_cache already hold this step's keys and values."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor | None,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as uint8 (a view): torch has no index_copy_ / index_put for float8."""
    return t.view(torch.uint8) if t.dtype in FLOAT8_DTYPES else t


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; into float8 saturated at the format's largest finite value first. torch's own
    cast does not promise it: 2.13 on the CPU saturates e4m3 but gives inf for e5m2 past 61,440, and 2.11 on
    CUDA gave e4m3's NaN where the write kernel stores 448 (BENCHMARKS.md, run 44)."""
    if dtype in FLOAT8_DTYPES:
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)
    return x.to(dtype)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatters this step's keys and values into their cache slots (torch reference of the fused kernel)."""
    num_blocks, block_size = k_cache.shape[:2]
    flat_k = raw_bytes(k_cache).view(num_blocks * block_size, *k_cache.shape[2:])
    flat_v = raw_bytes(v_cache).view(num_blocks * block_size, *v_cache.shape[2:])
    k, v = raw_bytes(to_cache_dtype(k, k_cache.dtype)), raw_bytes(to_cache_dtype(v, v_cache.dtype))
    if slot_mapping.is_cpu:  # the same answer for every layer of the step: check once
        all_valid = _derived(slot_mapping, "all_valid", lambda: bool((slot_mapping >= 0).all()))
        if all_valid:
            flat_k.index_copy_(0, slot_mapping, k)
            flat_v.index_copy_(0, slot_mapping, v)
            return
    valid = slot_mapping >= 0
    if bool(valid.all()):
        flat_k.index_copy_(0, slot_mapping, k)
        flat_v.index_copy_(0, slot_mapping, v)
    else:
        flat_k[slot_mapping[valid]] = k[valid]
        flat_v[slot_mapping[valid]] = v[valid]


def _derived(anchor: torch.Tensor, key: str, make):
    """`make()` once per forward pass on the CPU: cached in the running step's metadata (which the
    CPU runner builds afresh each step). Elsewhere (CUDA graphs reuse metadata) always recomputed."""
    meta = _current
    if meta is None or not anchor.is_cpu:
        return make()
    if key not in meta.derived:
        meta.derived[key] = make()
    return meta.derived[key]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


class TorchAttentionBackend:
    """Portable reference: one scaled_dot_product_attention call per sequence (CPU and GPU).

    Decode-only batches are grouped into one padded call, which is what makes batched decoding
    on the CPU pay off; mixed batches loop over sequences.
    """

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if k_cache is None or meta.block_tables is None:
            return self._prefill_no_cache(q, k, v, meta, scale)
        if meta.is_decode_only:
            return self._decode_batched(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        starts = meta.query_start_loc
        for i, seq_len in enumerate(meta.seq_lens):
            s, e = starts[i], starts[i + 1]
            keys = gather_kv(k_cache, meta.block_tables[i], seq_len)
            values = gather_kv(v_cache, meta.block_tables[i], seq_len)
            out[s:e] = _causal_attention(q[s:e], keys.to(q.dtype), values.to(q.dtype), scale)
        return out

    @staticmethod
    def _prefill_no_cache(q, k, v, meta, scale):
        out = torch.empty_like(q)
        starts = meta.query_start_loc
        for i in range(meta.num_seqs):
            s, e = starts[i], starts[i + 1]
            out[s:e] = _causal_attention(q[s:e], k[s:e], v[s:e], scale)
        return out

    @staticmethod
    def _decode_batched(q, k_cache, v_cache, meta, scale):
        # q: [num_seqs, num_heads, head_dim], one query per sequence.
        num_seqs, max_len = meta.num_seqs, meta.max_seq_len
        if num_seqs == 1 and q.is_cpu:
            return TorchAttentionBackend._decode_one_cpu(q, k_cache, v_cache, meta, scale)
        tables = _decode_tables(meta, k_cache.shape[1])
        # [num_seqs, max_len, num_kv_heads, head_dim]
        keys = k_cache[tables].flatten(1, 2)[:, :max_len].to(q.dtype)
        values = v_cache[tables].flatten(1, 2)[:, :max_len].to(q.dtype)

        def make_mask():
            if min(meta.seq_lens) == max_len:  # e.g. a single sequence: nothing to mask
                return None
            lens = torch.tensor(meta.seq_lens, device=q.device)
            return torch.arange(max_len, device=q.device)[None, :] >= lens[:, None]  # [num_seqs, max_len]

        padding = _derived(meta.block_tables, "decode_padding", make_mask)  # True: past the sequence's end
        # Two batched matmuls with the query heads grouped per KV head: on the CPU this is several
        # times faster than scaled_dot_product_attention's flash kernel for one query per sequence.
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = keys.shape[2]
        qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S, KVH, G, D]
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float().mul_(scale)  # [S, KVH, G, max_len]
        if padding is not None:
            scores.masked_fill_(padding[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.transpose(1, 2))  # [S, KVH, G, D]
        return out.reshape(num_seqs, num_heads, head_dim)

    @staticmethod
    def _decode_one_cpu(q, k_cache, v_cache, meta, scale):
        # One decode sequence on the CPU (batch-1 latency): float32 batched matmuls over the KV heads
        # take about half the time of bfloat16 ones at this size (oneDNN's per-call cost dominates).
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k_cache.shape[2]
        keys = _sequence_tokens(k_cache, meta).transpose(0, 1).float()  # [KVH, seq_len, D]
        values = _sequence_tokens(v_cache, meta).transpose(0, 1).float()
        qg = q.view(num_kv_heads, num_heads // num_kv_heads, head_dim).float()  # [KVH, G, D]
        probs = torch.softmax(torch.bmm(qg, keys.transpose(1, 2)).mul_(scale), dim=-1)  # [KVH, G, seq_len]
        return torch.bmm(probs, values).to(q.dtype).reshape(1, num_heads, head_dim)


def _decode_tables(meta: AttentionMetadata, block_size: int) -> torch.Tensor:
    """The block tables of a decode step cut to the blocks in use, as int64 indices (once per step)."""
    max_blocks = (meta.max_seq_len + block_size - 1) // block_size
    return _derived(meta.block_tables, "decode_tables", lambda: meta.block_tables[:, :max_blocks].long())


def _first_block_if_contiguous(table: torch.Tensor) -> int | None:
    """The first block id when the blocks of `table` (one sequence's, in use) are consecutive ids."""
    ids = table.tolist()
    return ids[0] if ids == list(range(ids[0], ids[0] + len(ids))) else None


def _sequence_tokens(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The cached tokens of a single-sequence step, [seq_len, num_kv_heads, head_dim]: a view of the
    cache when the sequence's blocks are consecutive (the usual case, as the block manager hands out
    free blocks in order), which saves a gather per layer; else gathered block by block."""
    seq_len, block_size = meta.max_seq_len, cache.shape[1]
    table = _decode_tables(meta, block_size)[0]
    first = _derived(meta.block_tables, "first_block", lambda: _first_block_if_contiguous(table))
    if first is None:
        return cache[table].flatten(0, 1)[:seq_len]
    start = first * block_size
    return cache.flatten(0, 1)[start : start + seq_len]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, H, D] are the last q_len positions of k, v: [kv_len, KVH, D]."""
    q_len, kv_len = q.shape[0], k.shape[0]
    if q_len == kv_len:
        mask, causal = None, True
    elif q_len == 1:
        mask, causal = None, False
    else:
        # Query row r sits at absolute position kv_len - q_len + r and sees keys up to it.
        rows = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        mask, causal = torch.arange(kv_len, device=q.device)[None, :] <= rows, False
    # A batch dimension of one: torch's CPU flash-attention kernel takes only 4-D inputs, and 3-D ones went to the
    # math path (a 2,048-token prompt of the demo model: 489 against 68 ms a layer).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


class Attention(nn.Module):
    """RoPE on q and k, this step's keys/values into the bound cache, then the backend.

    With fused kernels on a CUDA input, RoPE and the cache write are one kernel (RoPE alone when no cache
    is bound); otherwise the torch code: RoPE in place on the q|k columns with the step's cos/sin looked
    up once for all layers, and `write_kv_cache`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary: RotaryEmbedding,
                 opts: LayerOptions) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.rotary = rotary
        self.fused = opts.fused
        self.cpu_kernels = opts.fused_kernels
        self.backend: AttentionBackend = TorchAttentionBackend()
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, rows: OutputRows | None = None) -> torch.Tensor:
        """positions: [num_tokens]; qkv: [num_tokens, (heads + 2 * kv_heads) * head_dim], the qkv
        projection's output (RoPE'd in place on the torch path). rows: only these query rows' outputs
        are wanted. Returns [num_tokens or rows.count, heads * head_dim]."""
        n = qkv.shape[0]
        meta = current_metadata(n)
        use_cache = self.k_cache is not None and meta.slot_mapping is not None
        if (self.cpu_kernels and not qkv.is_cuda and use_cache and rows is None and meta.is_decode_only
                and cpu_attention.supported(qkv, self.k_cache)):  # a decode step on the CPU: one C++ call
            return cpu_attention.decode(qkv, self.rotary.table(qkv.device), self.k_cache, self.v_cache, positions,
                                        meta.slot_mapping, meta.block_tables, meta.seq_lens, self.num_heads,
                                        self.num_kv_heads, self.scale)
        if self.fused and qkv.is_cuda:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            from qwen_serve.kernels import fused

            table = self.rotary.table(qkv.device)
            if use_cache:  # RoPE, and k/v into the paged cache, in one kernel
                q, k = fused.rotary_and_write_kv(positions, q, k, v, table, self.head_dim, self.k_cache,
                                                 self.v_cache, meta.slot_mapping)
            else:
                q, k = fused.rotary(positions, q, k, table, self.head_dim)
        else:
            cos_sin = _derived(positions, "rope_cos_sin", lambda: self.rotary.cos_sin(positions, qkv.device))
            # q and k sit side by side in qkv: rotate both in one call, in place.
            self.rotary.rotate_(qkv[:, : self.q_size + self.kv_size], cos_sin)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if use_cache:
                write_kv_cache(k.view(n, self.num_kv_heads, self.head_dim), v.reshape(n, self.num_kv_heads, self.head_dim),
                               self.k_cache, self.v_cache, meta.slot_mapping)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if rows is not None:
            if not use_cache:
                raise ValueError("attention for selected rows reads their keys from the KV cache; none is bound")
            if rows.count == 0:
                return q.new_empty(0, self.q_size)
            # Each row attends to its whole context, all of it in the cache by now: a decode-shaped batch.
            with forward_context(rows.meta):
                out = self.backend.forward(q[rows.index], k, v, self.k_cache, self.v_cache, rows.meta, self.scale)
            return out.reshape(rows.count, self.q_size)
        out = self.backend.forward(
            q, k, v, self.k_cache if use_cache else None, self.v_cache if use_cache else None, meta, self.scale
        )
        return out.reshape(n, self.q_size)


def bind_kv_cache(model: nn.Module, kv_cache: torch.Tensor | None, backend: AttentionBackend | None = None) -> int:
    """Gives each attention layer its slice of `kv_cache` [2, num_layers, num_blocks, block_size, kv_heads, head_dim].

    Returns the number of layers bound. `None` unbinds (plain prefill without cache).
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for i, layer in enumerate(layers):
        layer.k_cache = None if kv_cache is None else kv_cache[0, i]
        layer.v_cache = None if kv_cache is None else kv_cache[1, i]
        if backend is not None:
            layer.backend = backend
    return len(layers)
