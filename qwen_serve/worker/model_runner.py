"""The only owner of device memory: model weights, the KV cache, per-step input tensors, sampling.

`execute(SchedulerOutput) -> RunnerOutput` runs one step: block copies (copy-on-write of forked
samples), one forward pass over the flat batch of every scheduled chunk, logits only for the rows
that sample, batched sampling, and a single device->host copy of the results.

The KV cache is one tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]: on the
CPU sized from `kv_cache_gb` (or `num_kv_blocks`); on a GPU from what `gpu_memory_utilization`
leaves after a profiling forward pass at the largest step the scheduler can make.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.request import Sequence
from qwen_serve.engine.scheduler import SchedulerOutput
from qwen_serve.layers.attention import AttentionMetadata, bind_kv_cache, forward_context
from qwen_serve.layers.sampler import SamplerOutput, SamplingTensors, sample
from qwen_serve.models.config import Qwen2Config

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None  # of the sampled token, under the raw model distribution
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # the top alternatives (token id, logprob)


@dataclass(slots=True)
class RunnerOutput:
    sampled: list[SampledToken]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: Qwen2Config, config: EngineConfig,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int]) -> None:
        self.model = model
        self.cfg = model_config
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = list(eos_token_ids)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> the generator of a seeded sample
        self.default_generator = torch.Generator(device=device).manual_seed(config.seed)
        self._bitmask: torch.Tensor | None = None  # structured output: allowed ids, int32 [rows, V/32]
        self.num_blocks = self._num_kv_blocks()
        # [2, layers, blocks, block_size, kv_heads, head_dim]: keys then values, sliced per layer.
        self.kv_cache = torch.zeros(2, model_config.num_hidden_layers, self.num_blocks, self.block_size,
                                    model_config.num_key_value_heads, model_config.head_dim, dtype=dtype, device=device)
        bind_kv_cache(model, self.kv_cache, self._attention_backend())
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)

    @classmethod
    def load(cls, folder: Path | None, model_config: Qwen2Config, config: EngineConfig, device: torch.device,
             dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int]) -> "ModelRunner":
        """Loads the folder's weights, or random ones (benchmarks of a shape) when `folder` is None."""
        if folder is None:
            from qwen_serve.loader.weights import build_model, random_weights

            model = build_model(model_config, dtype, device)
            random_weights(model, config.seed)
        else:
            from qwen_serve.loader.model_loader import load_model

            model = load_model(folder, model_config, dtype, device)
        if device.type == "cpu":
            from qwen_serve.worker.cpu_linear import pack_linears

            pack_linears(model)
        return cls(model, model_config, config, device, dtype, max_model_len, eos_token_ids)

    def _attention_backend(self):
        """The Triton paged-attention kernels on CUDA (when available); else the torch reference."""
        from qwen_serve.layers import kernel_dispatch

        if not kernel_dispatch.use_kernels(self.kv_cache):
            return None
        from qwen_serve.kernels.attention import TritonAttentionBackend

        return TritonAttentionBackend()

    # ---- KV cache sizing -----------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        c = self.cfg
        return 2 * c.num_hidden_layers * self.block_size * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(self.config.kv_cache_gb * 2**30) // self.block_bytes)
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Runs the largest step without a cache, then gives the KV cache what the budget leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        num_seqs = max(1, min(self.config.max_num_seqs, num_tokens))
        lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        with torch.inference_mode(), forward_context(AttentionMetadata.prefill_without_cache(lens)):
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[: num_seqs])
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        available = total * self.config.gpu_memory_utilization - (total - free) - (peak - current)
        num_blocks = int(available) // self.block_bytes
        if num_blocks < 1:
            raise ValueError(f"no GPU memory left for the KV cache at --gpu-memory-utilization "
                             f"{self.config.gpu_memory_utilization}; raise it or lower --max-num-batched-tokens")
        log.info("GPU profile: peak activations %.2f GiB; KV cache fits %d tokens",
                 (peak - current) / 2**30, num_blocks * self.block_size)
        return num_blocks

    # ---- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for seq_id in sched.finished_seq_ids:
            self.generators.pop(seq_id, None)
        if sched.block_copies:
            src = torch.tensor([s for s, _ in sched.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in sched.block_copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        if not sched.chunks:
            return RunnerOutput([])

        ids, positions, slots, query_start, seq_lens, tables = [], [], [], [0], [], []
        sample_rows: list[int] = []  # hidden-state row each sampling sequence reads
        sample_seqs: list[Sequence] = []
        bs = self.block_size
        for chunk in sched.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_ids
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            for s in chunk.sample_seqs:
                sample_rows.append(query_start[-1] - 1)
                sample_seqs.append(s)

        width = max(len(t) for t in tables)
        on_gpu = self.device.type == "cuda"
        meta = AttentionMetadata(
            query_start_loc=query_start,
            seq_lens=seq_lens,
            slot_mapping=self._to_device(slots, torch.long),  # [num_tokens]
            block_tables=self._to_device([t + [0] * (width - len(t)) for t in tables], torch.int32),  # [S, width]
            max_query_len=max(c.num_tokens for c in sched.chunks),
            max_seq_len=max(seq_lens),
            query_start_loc_t=self._to_device(query_start, torch.int32) if on_gpu else None,
            seq_lens_t=self._to_device(seq_lens, torch.int32) if on_gpu else None,
        )
        input_ids = self._to_device(ids, torch.long)  # [num_tokens]
        pos = self._to_device(positions, torch.long)  # [num_tokens]
        with forward_context(meta):
            hidden = self.model(input_ids, pos)  # [num_tokens, hidden]
        if not sample_seqs:
            return RunnerOutput([])
        # Logits only for the rows that sample: [num_samples, vocab] float32.
        logits = self.model.compute_logits(hidden[self._to_device(sample_rows, torch.long)])
        self._apply_grammars(logits, sample_seqs)
        st = self._sampling_tensors(sample_seqs, logits.shape[1])
        result = sample(logits, st)
        return RunnerOutput(self._to_host(sample_seqs, st, result))

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Host list -> device tensor; on a GPU through pinned memory, without waiting for the copy."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype).pin_memory().to(self.device, non_blocking=True)

    # ---- sampling inputs and outputs ---------------------------------------------------------

    def _sampling_tensors(self, seqs: list[Sequence], vocab: int) -> SamplingTensors:
        """Per-request settings as tensors, built once per step."""
        dev = self.device
        params = [s.request.params for s in seqs]
        temps = [p.temperature for p in params]
        greedy = [t == 0.0 or p.top_k == 1 for t, p in zip(temps, params)]
        all_greedy = all(greedy)
        st = SamplingTensors(
            temperature=torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=torch.float32, device=dev),
            greedy=torch.tensor(greedy, device=dev),
            all_greedy=all_greedy,
            top_k=[max(p.top_k, 0) for p in params],
            top_p=None, min_p=None,
            generators=[self._generator(s) for s in seqs] if not all_greedy else [None] * len(seqs),
            default_generator=self.default_generator,
        )
        if any(p.top_p < 1.0 for p in params):
            st.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        if any(p.min_p > 0.0 for p in params):
            st.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        self._penalties(st, seqs, params, vocab)
        self._banned(st, seqs, params, vocab)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            st.logprob_rows = torch.tensor(want, dtype=torch.long, device=dev)
            st.max_logprobs = max(params[i].logprobs for i in want)
        return st

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.request.params.seed
        if seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            # Sample k of a seeded request gets its own stream, so the n samples differ.
            sample_seed = seed if seq.sample_index == 0 else hash((seed, seq.sample_index)) & (2**63 - 1)
            g = self.generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(sample_seed)
        return g

    def _penalties(self, st: SamplingTensors, seqs: list[Sequence], params, vocab: int) -> None:
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_freq = any(p.frequency_penalty != 0.0 for p in params)
        use_pres = any(p.presence_penalty != 0.0 for p in params)
        if not (use_rep or use_freq or use_pres):
            return
        dev, n = self.device, len(seqs)
        # Token statistics via one scatter over padded id lists; the pad id `vocab` lands in a spare column.
        def counts(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(x) for x in lists))
            idx = torch.tensor([x + [vocab] * (width - len(x)) for x in lists], dtype=torch.long, device=dev)
            out = torch.zeros(n, vocab + 1, dtype=torch.float32, device=dev)
            out.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=dev))
            return out[:, :vocab]

        st.output_counts = counts([s.output_token_ids for s in seqs])
        if use_rep:
            prompt_seen = counts([s.token_ids[: s.num_prompt_tokens] for s in seqs]) > 0
            st.seen_mask = prompt_seen | (st.output_counts > 0)
            st.repetition = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=dev)
        if use_freq:
            st.frequency = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev)
        if use_pres:
            st.presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev)

    def _banned(self, st: SamplingTensors, seqs: list[Sequence], params, vocab: int) -> None:
        """Stop tokens a row may not sample before its min_tokens, as (row, token id) pairs."""
        rows, tokens = [], []
        for i, (s, p) in enumerate(zip(seqs, params)):
            if s.num_output_tokens < p.min_tokens:
                stops = [t for t in list(p.stop_token_ids or []) + ([] if p.ignore_eos else self.eos_token_ids) if t < vocab]
                rows += [i] * len(stops)
                tokens += stops
        if rows:
            st.banned = (self._to_device(rows, torch.long), self._to_device(tokens, torch.long))

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Masks what each structured-output row's grammar forbids (before sampling, as vLLM does,
        so those rows' logprobs are of the constrained distribution). logits: [n, V]."""
        rows = [(i, s.constraint) for i, s in enumerate(seqs) if s.constraint is not None]
        if not rows:
            return
        if all(hasattr(c, "fill_bitmask") for _, c in rows):
            # The structured module's packed path: one int32 bitmask [n, V/32] filled on its threads.
            from qwen_serve.structured.constraint import allocate_bitmask, apply_bitmask_, fill_bitmasks

            n = len(seqs)
            if self._bitmask is None or self._bitmask.shape[0] < n:
                self._bitmask = allocate_bitmask(max(n, self.config.max_num_seqs), logits.shape[1])
            bitmask = self._bitmask[:n]
            bitmask.fill_(-1)  # unconstrained rows: everything allowed
            fill_bitmasks([(c, i) for i, c in rows], bitmask)
            apply_bitmask_(logits, bitmask)
            return
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
        for i, c in rows:
            allowed.zero_()
            c.fill_mask(allowed)
            logits[i].masked_fill_(~allowed.to(logits.device), float("-inf"))

    def _to_host(self, seqs: list[Sequence], st: SamplingTensors, out: SamplerOutput) -> list[SampledToken]:
        # NOTE: the one device->host copy (and CPU-GPU synchronization) of the step happens here.
        parts = [out.token_ids.double()]
        if out.sampled_logprob is not None:
            parts += [out.sampled_logprob.double(), out.sampled_rank.double()]
            if out.top_ids is not None:
                parts += [out.top_ids.double().flatten(), out.top_logprobs.double().flatten()]
        host = torch.cat(parts).tolist()
        n = len(seqs)
        sampled = [SampledToken(s, int(t)) for s, t in zip(seqs, host[:n])]
        if out.sampled_logprob is not None:
            rows = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
            m, k = len(rows), st.max_logprobs
            lps, ranks = host[n : n + m], host[n + m : n + 2 * m]
            top_ids = host[n + 2 * m : n + 2 * m + m * k]
            top_lps = host[n + 2 * m + m * k :]
            for j, row in enumerate(rows):
                tok = sampled[row]
                want = tok.seq.request.params.logprobs
                tok.logprob, tok.rank = lps[j], int(ranks[j])
                tok.top = [(int(top_ids[j * k + r]), top_lps[j * k + r]) for r in range(want)]
        return sampled
