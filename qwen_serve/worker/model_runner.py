"""The only owner of device memory: model weights, the KV cache, per-step input tensors, sampling.

`launch(StepInput) -> StepHandle` queues one step: block copies (copy-on-write of forked
samples), one forward pass over the flat batch of every scheduled chunk (whose last layer computes only
the rows that sample, unless prompt logprobs need them all), logits only for those rows, batched
sampling, and a single device->host copy of the results; `collect(handle)` waits for that copy and
returns the sampled tokens.

The KV cache is one tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim] of the model's
dtype or `--kv-cache-dtype` (float8: written saturated, read cast to the model's dtype): on the
CPU sized from `kv_cache_gb` (or `num_kv_blocks`); on a GPU from what `gpu_memory_utilization`
leaves after a profiling forward pass at the largest step the scheduler can make.

On CUDA with the Triton attention backend, decode-only steps (and the verify steps of speculative
decoding) replay CUDA graphs captured once the KV cache is bound (worker/cuda_graphs.py), unless
`enforce_eager`; the graph also computes every row's logits and argmax, which the sampler takes as the
greedy choice. Prefill and mixed steps run eagerly; one of each kind runs at start-up
(worker/warm_up.py), so no Triton compile is left for the requests.
With `enforce_eager` decode steps run eagerly too, and their kernel variants (one per split count)
compile on first use.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qwen_serve.config import KV_CACHE_DTYPES, EngineConfig
from qwen_serve.distributed.parallel import ParallelContext, kv_head_range
from qwen_serve.engine.speculative import SpeculativeConfig
from qwen_serve.kernels import int4pack, quant_linear
from qwen_serve.layers.attention import AttentionMetadata, OutputRows, bind_kv_cache, forward_context, raw_bytes
from qwen_serve.layers.options import LayerOptions, triton_available
from qwen_serve.models.config import ModelConfig
from qwen_serve.worker.cuda_graphs import DecodeGraphs, pad_to_query_len
from qwen_serve.worker.host_arrays import block_table_array, host_tensor
from qwen_serve.worker.host_memory import trim_heap
from qwen_serve.worker.prompt_logprobs import PendingPromptLogprobs, launch_prompt_logprobs, wants_prompt_logprobs
from qwen_serve.worker.step_input import RunnerOutput, SampleRow, StepInput
from qwen_serve.worker.step_sampler import PendingSample, StepSampler
from qwen_serve.worker.warm_up import eager_warm_up_steps

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepHandle:
    """A launched step: its sampling and prompt logprobs, still on the device (None when no sequence
    samples / no chunk asked for prompt logprobs)."""

    sample: PendingSample | None
    prompt_logprobs: PendingPromptLogprobs | None = None



# The largest head size whose float32 prefill tiles fit the paged-attention kernel's shared memory: at 128 the
# kernel asked for 329 KB against the H200's 227 KB (OutOfResources); 64 ran (BENCHMARKS.md, H200, run 17).
MAX_FLOAT32_HEAD_DIM = 64


def check_kernel_dtype(device: torch.device, dtype: torch.dtype, head_dim: int, opts: LayerOptions,
                       kv_cache_dtype: str = "auto") -> None:
    """Refuses, before any weight is loaded, a dtype the GPU kernels cannot run for this model."""
    uses_kernels = device.type == "cuda" and opts.fused
    if uses_kernels and dtype == torch.float32 and head_dim > MAX_FLOAT32_HEAD_DIM:
        raise ValueError(f"--dtype float32 on a GPU needs head_dim <= {MAX_FLOAT32_HEAD_DIM} (this model has "
                         f"{head_dim}): the attention kernel's float32 tiles do not fit in shared memory; "
                         "use --dtype bfloat16 or float16")
    # Triton converts float8 in hardware from Ada / Hopper on (compute capability 8.9).
    if device.type == "cuda" and kv_cache_dtype != "auto" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} needs a GPU of compute capability 8.9 or newer "
                         f"(Ada, Hopper); this one is {major}.{minor}: use --kv-cache-dtype auto")


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype -> the cache tensor's dtype (auto: the model's)."""
    name = KV_CACHE_DTYPES[kv_cache_dtype]
    return dtype if name is None else getattr(torch, name)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, config: EngineConfig,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int],
                 parallel: ParallelContext | None = None) -> None:
        self.model = model
        self.parallel = parallel or ParallelContext()
        # This rank's attention heads: all of them without tensor parallelism.
        self.num_heads = model_config.num_attention_heads // self.parallel.size
        self.num_kv_heads = kv_head_range(model_config.num_key_value_heads, self.parallel.size, self.parallel.rank)[1]
        self.fused_kernels = config.fused_kernels and triton_available()
        self.cfg = model_config
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype)
        self.sampler = StepSampler(device, config.seed, eos_token_ids, self._to_device)
        # The last launch's sampled tokens on the device, and each sampling sequence's row in them.
        self._last_tokens = torch.zeros(0, dtype=torch.long, device=device)
        self._last_rows: dict[int, int] = {}
        self.num_blocks = self._num_kv_blocks()
        # [2, layers, blocks, block_size, kv_heads, head_dim]: keys then values, sliced per layer.
        self.kv_cache = torch.zeros(2, model_config.num_hidden_layers, self.num_blocks, self.block_size,
                                    self.num_kv_heads, model_config.head_dim, dtype=self.cache_dtype, device=device)
        backend = self._attention_backend()
        bind_kv_cache(model, self.kv_cache, backend)
        if backend is not None:
            backend.warm_up(self.num_heads, self.num_kv_heads, model_config.head_dim,
                            dtype, device)
            self._warm_up_eager(backend.dense_prefill_min_len)
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)
        self.graphs = None if backend is None or config.enforce_eager else self._capture_graphs()

    @classmethod
    def load(cls, folder: Path | None, model_config: ModelConfig, config: EngineConfig, device: torch.device,
             dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int],
             parallel: ParallelContext | None = None) -> "ModelRunner":
        """Loads the folder's weights (this rank's slice of them under tensor parallelism), or random ones
        (benchmarks of a shape) when `folder` is None. The quantization method (`--quantization`, or the
        checkpoint's) is read and checked before any weight."""
        from qwen_serve.layers.quantization import AT_LOAD_METHODS, quantization_config, release_config

        raw = model_config.raw
        if folder is None and config.quantization not in (None, *AT_LOAD_METHODS):  # codes in Qwen's release layout
            raw = {**raw, "quantization_config": release_config(config.quantization)}
        quant = quantization_config(config.quantization, raw, f"{folder or 'the model'}/config.json")
        if quant is not None:
            quant.check_device(device, dtype)
        opts = LayerOptions(quant_config=quant, fused_kernels=config.fused_kernels, parallel=parallel or ParallelContext())
        check_kernel_dtype(device, dtype, model_config.head_dim, opts, config.kv_cache_dtype)
        if folder is None:
            from qwen_serve.loader.weights import build_model, random_weights

            model = build_model(model_config, dtype, device, opts)
            random_weights(model, config.seed)
        else:
            from qwen_serve.loader.model_loader import load_model

            model = load_model(folder, model_config, dtype, device, opts)
        if device.type == "cpu":
            from qwen_serve.kernels import cpu_extension
            from qwen_serve.kernels.cpu_linear import pack_linears

            # Built (~40 s the first time on a machine) before the server says it is ready, not inside
            # the first request, whose reply would wait for it (a GGUF model's load builds them anyway).
            if config.fused_kernels:
                cpu_extension.available()
            pack_linears(model)
            trim_heap()  # the load's temporaries leave their pages with the allocator otherwise
        return cls(model, model_config, config, device, dtype, max_model_len, eos_token_ids, parallel)

    def _attention_backend(self):
        """The Triton paged-attention kernels on CUDA (with fused kernels on); else the torch reference.
        QWEN_SERVE_FA3=0 keeps long prefill chunks on cuDNN where FlashAttention-3 would take them (A/B runs)."""
        if not (self.fused_kernels and self.kv_cache.is_cuda):
            return None
        from qwen_serve.kernels.attention import TritonAttentionBackend

        long_chunks = "cudnn" if os.environ.get("QWEN_SERVE_FA3", "1") == "0" else "auto"
        backend = TritonAttentionBackend(long_chunk_kernel=long_chunks)
        if backend.uses_fa3(self.kv_cache.dtype, self.kv_cache.device):
            log.info("Long prefill chunks: FlashAttention-3 (fa3-fwd)")
        return backend

    def close(self) -> None:
        """Frees the device memory this runner holds (weights, KV cache, CUDA graphs) even while
        something else still references the runner or its model; the runner is unusable after."""
        self.graphs = None
        bind_kv_cache(self.model, None)
        self.kv_cache = torch.empty(0, device="meta")
        for module in self.model.modules():  # oneDNN-packed CPU weights cannot move to meta: drop them
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is not None and t.is_mkldnn:
                        tensors[name] = torch.empty(0, device="meta")
        self.model.to(torch.device("meta"))  # the parameters' storage goes, whoever holds the module
        self._last_tokens = torch.empty(0, dtype=torch.long, device="meta")

    def _capture_graphs(self) -> DecodeGraphs:
        spec = SpeculativeConfig.parse(self.config.speculative_config)
        # Verify steps: up to k drafts after each sequence's last token, at the batches speculation runs at.
        max_query, verify_seqs = (1 + spec.num_speculative_tokens, spec.disable_by_batch_size) if spec else (1, 0)
        graphs = DecodeGraphs(self.model, self.device, self.config.max_num_seqs, self.max_model_len,
                              self.block_size, self.cfg.vocab_size, max_query, verify_seqs)
        graphs.capture()
        return graphs

    @torch.inference_mode()
    def _warm_up_eager(self, dense_min_len: int | None) -> None:
        """Runs each kind of eager step once (`eager_warm_up_steps`), so that Triton compiles their kernel
        variants now rather than inside the first requests that need them (seconds each; decode graphs
        compile theirs at capture). Nothing is written to the cache (every slot is -1) and every block
        table points at block 0, which the steps only read."""
        start = time.perf_counter()
        steps = eager_warm_up_steps(self.config.max_num_seqs, self.config.max_num_batched_tokens, self.max_model_len,
                                    self.block_size, dense_min_len,
                                    max(int4pack.MM_ROWS_MAX, quant_linear.MM_MAX_ROWS))
        for step in steps:
            positions, query_start, seq_lens = [], [0], []
            for n, ctx in zip(step.query_lens, step.context_lens):
                positions.extend(range(ctx, ctx + n))
                query_start.append(query_start[-1] + n)
                seq_lens.append(ctx + n)
            width = -(-max(seq_lens) // self.block_size)
            input_ids = torch.zeros(len(positions), dtype=torch.long, device=self.device)
            hidden = self._forward_eager(input_ids, positions, [-1] * len(positions), query_start, seq_lens,
                                         np.zeros((len(seq_lens), width), dtype=np.int32), max(step.query_lens),
                                         list(range(len(seq_lens))))
            self.model.compute_logits(hidden)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host waits: compiles and first launches end here
        log.info("ran %d eager warm-up steps in %.1f s", len(steps), time.perf_counter() - start)

    # ---- KV cache sizing -----------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        c = self.cfg
        return 2 * c.num_hidden_layers * self.block_size * self.num_kv_heads * c.head_dim * self.cache_dtype.itemsize

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
        # Prompts of at most 1024 tokens: the torch attention this pass runs (the kernels need the
        # cache) may fall back to materialising every score, n^2 per head; the kernels' attention
        # memory for longer chunks is linear in n and small next to the MLP's activations.
        num_seqs = max(1, min(self.config.max_num_seqs, num_tokens), -(-num_tokens // 1024))
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
    def launch(self, step: StepInput) -> StepHandle:
        """Queues one step on the device and returns without waiting for it. A sequence one token
        ahead of its token_ids (num_pending_tokens) reads that token from the previous launch's
        samples on the device, so a step can be launched before the previous one is collected."""
        self.sampler.forget(step.finished_seq_ids)
        if step.block_copies:
            src = self._to_device([s for s, _ in step.block_copies], torch.long)
            dst = self._to_device([d for _, d in step.block_copies], torch.long)
            cache = raw_bytes(self.kv_cache)  # float8 has no index_put
            cache[:, :, dst] = cache[:, :, src]
        if not step.chunks:
            return StepHandle(None)

        ids, positions, slots, query_start, seq_lens, tables = [], [], [], [0], [], []
        pending_at: list[int] = []  # flat input positions whose token is still on the device
        pending_from: list[int] = []  # ... and its row in the previous launch's samples
        sample_rows: list[int] = []  # hidden-state row each sampling sequence reads
        samples: list[SampleRow] = []
        out_chunks: list[int] = []  # the chunks that sample, in order
        sample_outs: list[int] = []  # each sampling sequence's index in out_chunks
        bs = self.block_size
        for chunk in step.chunks:
            start, n = chunk.start, chunk.num_tokens
            ids.extend(chunk.token_ids)
            if len(chunk.token_ids) < n:  # the last input is the token this sequence sampled last step
                pending_at.append(len(ids))
                pending_from.append(self._last_rows[chunk.seq_id])
                ids.append(0)
            positions.extend(range(start, start + n))
            table = chunk.block_ids
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if chunk.samples:
                out_chunks.append(len(tables) - 1)
            for s in chunk.samples:
                for j in range(chunk.num_draft_tokens + 1):
                    sample_rows.append(query_start[-1] - 1 - chunk.num_draft_tokens + j)
                    sample_outs.append(len(out_chunks) - 1)
                    samples.append(replace(s, num_output_tokens=s.num_output_tokens + j) if j else s)
        input_ids = self._input_ids(ids, pending_at, pending_from)

        width = max(len(t) for t in tables)
        padded_tables = block_table_array(tables, width)
        greedy = None  # each sampling row's argmax, when the decode graph computed it
        # Decode and verify steps (each sequence's last token and its drafts; no prompt logprobs) may replay a graph.
        q = max(c.num_tokens for c in step.chunks)
        graphed = (self.graphs is not None and all(c.num_tokens == 1 + c.num_draft_tokens for c in step.chunks)
                   and self.graphs.fits(len(step.chunks), width, q, max(c.start for c in step.chunks) + q))
        if graphed and q == 1:
            # The graph also computes every row's logits and argmax.
            logits, greedy = self.graphs.run(input_ids, positions, slots, seq_lens, padded_tables)
            prompt_logprobs = None
            if sample_rows != list(range(len(ids))):
                logits, greedy = logits[self._to_device(sample_rows, torch.long)], None
        elif graphed:
            logits, greedy = self._run_verify_graph(step, q, input_ids, positions, slots, query_start,
                                                    padded_tables, sample_rows)
            prompt_logprobs = None
        else:
            # Unless prompt logprobs need every row, the model returns only the rows that sample
            # (the last layer skips the others), one per chunk in out_chunks.
            only_outputs = (len(out_chunks) < len(ids) and not wants_prompt_logprobs(step.chunks)
                            and not any(c.num_draft_tokens for c in step.chunks))
            hidden = self._forward_eager(input_ids, positions, slots, query_start, seq_lens, padded_tables,
                                         max(c.num_tokens for c in step.chunks), out_chunks if only_outputs else None)
            prompt_logprobs = launch_prompt_logprobs(self.model, hidden, step.chunks, query_start, self._to_device)
            # Logits only for the rows that sample: [num_samples, vocab] float32.
            rows = sample_outs if only_outputs else sample_rows
            logits = self.model.compute_logits(hidden[self._to_device(rows, torch.long)]) if samples else None
        if not samples:
            return StepHandle(None, prompt_logprobs)
        pending = self.sampler.launch(logits, samples, greedy, step.grammar_bitmask)
        self._last_tokens = pending.token_ids
        self._last_rows = {s.seq_id: i for i, s in enumerate(samples)}
        return StepHandle(pending, prompt_logprobs)

    def _run_verify_graph(self, step: StepInput, q: int, input_ids: torch.Tensor, positions: list[int],
                          slots: list[int], query_start: list[int], tables: np.ndarray,
                          sample_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A verify step through the graph of q tokens a sequence -> the sampling rows' logits and argmax."""
        layout = pad_to_query_len([c.start for c in step.chunks], query_start, positions, slots, q)
        out = self.graphs.run(input_ids, layout.positions, layout.slots, layout.seq_lens, tables, q,
                              self._to_device(layout.rows, torch.long))
        picked = self._to_device([layout.rows[r] for r in sample_rows], torch.long)
        return out.logits[picked], out.greedy[picked]

    def collect(self, handle: StepHandle) -> RunnerOutput:
        """Waits for a launched step and returns its sampled tokens."""
        return RunnerOutput(self.sampler.collect(handle.sample) if handle.sample is not None else [],
                            handle.prompt_logprobs.collect() if handle.prompt_logprobs is not None else [])

    def _input_ids(self, ids: list[int], pending_at: list[int], pending_from: list[int]) -> torch.Tensor:
        """[num_tokens] token ids on the device, the pending ones taken from the last launch's samples."""
        if pending_at and len(pending_at) == len(ids) == len(self._last_tokens) and pending_from == pending_at:
            return self._last_tokens  # steady decode: the same sequences, in the same order
        input_ids = self._to_device(ids, torch.long)
        if pending_at:
            src = self._to_device(pending_from, torch.long)
            input_ids[self._to_device(pending_at, torch.long)] = self._last_tokens[src]
        return input_ids

    def _forward_eager(self, input_ids: torch.Tensor, positions: list[int], slots: list[int], query_start: list[int],
                       seq_lens: list[int], tables: np.ndarray, max_query_len: int,
                       out_chunks: list[int] | None) -> torch.Tensor:
        """Hidden states of every row, or (out_chunks) of the last row of each of those chunks only."""
        on_gpu = self.device.type == "cuda"
        meta = AttentionMetadata(
            query_start_loc=query_start,
            seq_lens=seq_lens,
            slot_mapping=self._to_device(slots, torch.long),  # [num_tokens]
            block_tables=self._to_device(tables, torch.int32),  # [S, width]
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens),
            query_start_loc_t=self._to_device(query_start, torch.int32) if on_gpu else None,
            seq_lens_t=self._to_device(seq_lens, torch.int32) if on_gpu else None,
        )
        pos = self._to_device(positions, torch.long)  # [num_tokens]
        rows = None if out_chunks is None else OutputRows.last_rows(meta, out_chunks, self._to_device)
        with forward_context(meta):
            return self.model(input_ids, pos, rows)  # [num_tokens or len(out_chunks), hidden]

    def _to_device(self, values: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Host list or array -> device tensor; on a GPU through pinned memory, without waiting for the copy."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return host_tensor(values, dtype).pin_memory().to(self.device, non_blocking=True)
