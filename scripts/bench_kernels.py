"""GPU kernel and model-step benchmarks for qwen-serve's Triton kernels (one CUDA GPU, fixed seeds).

Sections (--sections, comma separated; default all):
  attn     decode attention, batch 1 and 64, contexts 4K..131K: Triton (split-KV auto, no split,
           variants) vs the torch reference, against the KV-read floor (bytes / read bandwidth).
  attnmix  decode attention at batch 64-256 over contexts drawn uniformly from 100-2048 (the throughput
           workload's shape): split counts, key-tile widths and pipeline stages, against the KV-read floor.
  prefill  one prefill chunk of 4K..32K tokens (with and without a cached prefix): Triton tile
           variants vs torch's flash SDPA on contiguous tensors, against the matmul-rate floor.
  chunked  a prefill chunk after a cached prefix: the backend's two cuDNN calls + merge vs single calls
           (GQA without expanding KV heads, lower-right causal mask).
  plans    the first call of torch's cuDNN attention at each new shape against its steady time: the
           one-time cost (graph build, kernel compile) a prompt of a new length pays, after the engine's
           start-up warm-up (`warm_up_dense`, timed too); --no-plan-warm-up leaves it out.
  fused    RMSNorm+residual, SwiGLU, RoPE kernels vs their torch references (CUDA-graph timed).
  model    the whole Qwen2.5-7B shape with random bf16 weights: prefill time (TTFT) at 4K..32K and
           131K (YaRN), and decode tok/s from a CUDA graph of one decode step (model + greedy argmax)
           at batch 1 (prompt 128 + 256 new, fused kernels on and off) and at long contexts and batch 64.
  pdl      the batch-1 decode graph with programmatic dependent launch off and on, alternated.
  gemm     the prefill's four GEMMs of one layer (qkv, o, gate_up, down) at 8K-32K rows, TFLOP/s: F.linear as
           the model calls it against other layouts and torch's cuBLAS / cuBLASLt preference.
  layouts  the long-chunk cuDNN calls in the engine's tensor layouts against contiguous heads-first copies,
           timed by do_bench and back to back, beside the gate_up GEMM and both alternating as in a layer.
  fa3      the backend's long-chunk path on cuDNN (causal call, prefix call, merge) against FlashAttention-3's
           forward (the fa3-fwd wheel; one call over the gathered prefix and chunk, causal aligned bottom-right):
           agreement with each other and a float32 reference, time by do_bench and back to back.
Prints a table per section and writes every figure to OUT/bench_kernels.json.

Timing: small kernels are captured in one CUDA graph that runs R different inputs back to back
(R chosen so the inputs exceed the 50 MB L2), median of the replays over R; large ones use
triton.testing.do_bench (median, L2 flushed before each run).

    python scripts/bench_kernels.py --out /tmp/bench [--sections attn,model]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from qwen_serve.kernels import fused
from qwen_serve.kernels.attention import TritonAttentionBackend, write_kv_cache
from qwen_serve.kernels.random_batch import random_paged_batch
from qwen_serve.layers.activation import SiluAndMul, silu_and_mul_reference
from qwen_serve.layers.linear import LinearBase
from qwen_serve.layers.norm import RMSNorm, rms_norm_reference
from qwen_serve.layers.vocab import VocabEmbedding
from qwen_serve.layers.attention import AttentionMetadata, TorchAttentionBackend, bind_kv_cache, forward_context
from qwen_serve.loader.weights import build_model, random_weights
from qwen_serve.models.config import ModelConfig

# Measured on the lent H100 (../shared/MODELS.md): read bandwidth and bf16 dense matmul rate.
READ_BW = 3058e9
MATMUL_FLOPS = 786e12
QWEN7B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
H, KVH, D = 28, 4, 128
PLAN_WARM_UP = True  # section plans: run the engine's start-up warm-up first (--no-plan-warm-up)
BF16 = torch.bfloat16


def graph_ms(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Median ms per call of one CUDA graph that runs every call once (warmed up eagerly first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def bench_ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def print_row(label: str, row: dict) -> None:
    """One measured row as `label k=v, ...` (floats to 4 significant digits), flushed so a cut run keeps it."""
    print(label + " " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)


def attention_call(backend, b) -> Callable[[], torch.Tensor]:
    return lambda: backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)


# ------------------------------------------------------------------------------------------ attn
def section_attn(rows: list[dict]) -> None:
    variants = {
        "split-auto": TritonAttentionBackend(),
        "split-auto min4": TritonAttentionBackend(min_split_tiles=4),
        "no-split": TritonAttentionBackend(num_splits=1),
    }
    for batch, contexts in ((1, (256, 1024, 4096, 16384, 65536, 131072)), (64, (1024, 4096, 32768, 131072))):
        for ctx in contexts:
            probe = random_paged_batch([(ctx - 1, 1)], H, KVH, D, 16, BF16, "cuda", seed=0)
            per_seq = probe.kv_bytes_read
            del probe
            size = per_seq * batch
            copies = max(1, min(16, math.ceil(256e6 / size)))
            batches = [random_paged_batch([(ctx - 1, 1)] * batch, H, KVH, D, 16, BF16, "cuda", seed=r) for r in range(copies)]
            floor_ms = size / READ_BW * 1e3
            row = {"batch": batch, "context": ctx, "kv_MB": size / 1e6, "floor_ms": floor_ms, "copies": copies}
            for name, backend in variants.items():
                ms = graph_ms([attention_call(backend, b) for b in batches])
                row[name] = ms
            row["splits_auto"] = variants["split-auto"].splits_for(torch.device("cuda"), batch, KVH, ctx)
            row["splits_min4"] = variants["split-auto min4"].splits_for(torch.device("cuda"), batch, KVH, ctx)
            if batch * ctx <= 256 * 1024:
                try:
                    row["torch-ref"] = bench_ms(attention_call(TorchAttentionBackend(), batches[0]))
                except torch.OutOfMemoryError:
                    row["torch-ref"] = "OOM"
            rows.append(row)
            del batches
            torch.cuda.empty_cache()
            print_row(f"attn b={batch} ctx={ctx}:", row)


def section_attnmix(rows: list[dict]) -> None:
    """Large decode batches of mixed lengths: with one program per (sequence, KV head) and no splits, the
    longest sequences finish last while other SMs idle; splits balance that at the cost of a merge."""
    import random

    variants = {  # "auto": the defaults (128-wide key tiles at these batches, no splits from batch 128)
        "auto": TritonAttentionBackend(),
        "64-wide": TritonAttentionBackend(wide_decode_block_n=64),
        "32-wide": TritonAttentionBackend(wide_decode_block_n=32),
        "splits2": TritonAttentionBackend(num_splits=2),
        "splits4": TritonAttentionBackend(num_splits=4),
        "stages2": TritonAttentionBackend(decode_num_stages=2),
        "stages4": TritonAttentionBackend(decode_num_stages=4),
        "64-wide stages2": TritonAttentionBackend(wide_decode_block_n=64, decode_num_stages=2),
        "warps8": TritonAttentionBackend(decode_num_warps=8),
        "warps2": TritonAttentionBackend(decode_num_warps=2),
        "warps8 stages2": TritonAttentionBackend(decode_num_warps=8, decode_num_stages=2),
        "64-wide warps2 stages2": TritonAttentionBackend(wide_decode_block_n=64, decode_num_warps=2,
                                                         decode_num_stages=2),
    }
    for batch in (64, 128, 256):
        rng = random.Random(batch)
        specs = [(rng.randint(100, 2047), 1) for _ in range(batch)]
        batches = [random_paged_batch(specs, H, KVH, D, 16, BF16, "cuda", seed=r) for r in range(4)]
        size = batches[0].kv_bytes_read
        floor_ms = size / READ_BW * 1e3
        row = {"batch": batch, "mean_context": sum(c for c, _ in specs) / batch + 1, "kv_MB": size / 1e6,
               "floor_ms": floor_ms}
        for name, backend in variants.items():
            ms = graph_ms([attention_call(backend, b) for b in batches])
            row[name] = ms
            row[name + " %floor"] = 100 * floor_ms / ms
        rows.append(row)
        del batches
        torch.cuda.empty_cache()
        print_row("attnmix", row)


# ------------------------------------------------------------------------------------------ prefill
def section_prefill(rows: list[dict]) -> None:
    variants = {
        "m128n64w8s3": TritonAttentionBackend(prefill_block_n=64, dense_prefill_min_len=None),
        "m128n128w8s3": TritonAttentionBackend(dense_prefill_min_len=None),
        "m128n32w4s3": TritonAttentionBackend(prefill_block_n=32, prefill_num_warps=4, dense_prefill_min_len=None),
        "backend default": TritonAttentionBackend(),
    }
    for ctx, new in ((0, 4096), (0, 8192), (0, 16384), (0, 32768), (24576, 8192), (122880, 8192)):
        b = random_paged_batch([(ctx, new)], H, KVH, D, 16, BF16, "cuda", seed=1)
        visible = new * ctx + new * (new + 1) / 2
        flops = 4 * H * D * visible
        row = {"context": ctx, "new": new, "TFLOP": flops / 1e12, "floor_ms": flops / MATMUL_FLOPS * 1e3}
        for name, backend in variants.items():
            try:
                row[name] = bench_ms(attention_call(backend, b))
            except Exception as e:  # a tile shape the compiler rejects (shared memory) is a result too
                row[name] = f"fail: {type(e).__name__}"
        if ctx == 0:
            q = b.q.transpose(0, 1)[None]  # [1, H, new, D]
            k = torch.randn(1, H, new, D, device="cuda", dtype=BF16)
            v = torch.randn(1, H, new, D, device="cuda", dtype=BF16)
            for label, kind in (("torch-flash(dense)", SDPBackend.FLASH_ATTENTION), ("torch-cudnn(dense)", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(kind):
                        row[label] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                except RuntimeError as e:
                    row[label] = f"fail: {str(e)[:60]}"
        rows.append(row)
        del b
        torch.cuda.empty_cache()
        print_row("prefill", row)


# ------------------------------------------------------------------------------------------ chunked
def section_chunked(rows: list[dict]) -> None:
    """A prefill chunk after a cached prefix, the long-prompt case: the backend's path (prefix gathered,
    one cuDNN call over the prefix and one causal over the chunk, merged by log-sum-exp) against single
    calls that would need no merge; and, for the rate of one long call, the whole prompt as one causal
    cuDNN call (its own FLOPs: the prefix's causal half too)."""
    from torch.nn.attention.bias import causal_lower_right

    scale = D**-0.5
    for ctx, new in ((8192, 8192), (24576, 8192), (114688, 16384)):
        b = random_paged_batch([(ctx, new)], H, KVH, D, 16, BF16, "cuda", seed=1)
        visible = new * ctx + new * (new + 1) / 2
        flops = 4 * H * D * visible
        row = {"context": ctx, "new": new, "TFLOP": flops / 1e12, "floor_ms": flops / MATMUL_FLOPS * 1e3}
        q = b.q.transpose(0, 1)[None]  # [1, H, new, D]
        k = torch.randn(1, KVH, ctx + new, D, device="cuda", dtype=BF16)  # prefix + chunk, contiguous
        v = torch.randn_like(k)
        mask = causal_lower_right(new, ctx + new)
        group = H // KVH
        variants = {
            "backend (2 cuDNN calls + merge)": attention_call(TritonAttentionBackend(), b),
            "cudnn prefix call, GQA (no expand)": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k[:, :, :ctx], v[:, :, :ctx], None, True, 0.0, False, False, scale=scale),
            "sdpa lower-right causal, GQA": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
            "sdpa lower-right causal, heads expanded": lambda: F.scaled_dot_product_attention(
                q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask, scale=scale),
        }
        prefix_flops = 4 * H * D * new * ctx  # the prefix call's own work
        for name, fn in variants.items():
            try:
                ms = bench_ms(fn)
                row[name] = ms
                row[name + " TFLOP/s"] = (prefix_flops if name.startswith("cudnn prefix") else flops) / ms / 1e9
            except Exception as e:  # an unsupported combination is a result too
                row[name] = f"fail: {type(e).__name__}: {str(e)[:80]}"
        whole = 4 * H * D * (ctx + new) * (ctx + new + 1) / 2
        try:
            q_all = torch.randn(1, H, ctx + new, D, device="cuda", dtype=BF16)
            ms = bench_ms(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                q_all, k, v, None, True, 0.0, True, False, scale=scale))
            row["cudnn whole prompt causal"], row["cudnn whole prompt causal TFLOP/s"] = ms, whole / ms / 1e9
            del q_all
        except Exception as e:
            row["cudnn whole prompt causal"] = f"fail: {type(e).__name__}: {str(e)[:80]}"
        try:  # a GQA call that runs must also be right: against the expanded heads
            got = variants["cudnn prefix call, GQA (no expand)"]()[0]
            want = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k[:, :, :ctx].repeat_interleave(group, dim=1), v[:, :, :ctx].repeat_interleave(group, dim=1),
                None, True, 0.0, False, False, scale=scale)[0]
            row["cudnn GQA max abs diff"] = (got.float() - want.float()).abs().max().item()
        except Exception as e:
            row["cudnn GQA max abs diff"] = f"fail: {type(e).__name__}"
        rows.append(row)
        del b, q, k, v
        torch.cuda.empty_cache()
        print_row("chunked", row)


# ------------------------------------------------------------------------------------------ layouts
def sustained_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Mean time of `calls` back-to-back calls, no L2 flush and no gaps: how the engine's prefill runs them
    (do_bench spaces its calls and flushes the L2 between them; run 23 found the two within ~3%)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def section_layouts(rows: list[dict]) -> None:
    """The long-chunk cuDNN calls in the engine's layouts (q, k, v as views of the qkv projection's output,
    token stride (H + 2 KVH) D; the gathered prefix token-major) against heads-first contiguous copies, each
    timed by do_bench and back to back; beside them the gate_up GEMM of the same rows, alone and
    alternating with the chunk's attention as a layer does. Wall-clock stamps let a clock log line up."""
    from qwen_serve.kernels.attention import _cudnn_attention, _heads_first

    scale = D**-0.5
    hidden, inter = QWEN7B["hidden_size"], QWEN7B["intermediate_size"]
    for ctx, new in ((0, 8192), (8192, 8192), (24576, 8192), (0, 16384), (98304, 16384)):
        qkv = torch.randn(new, (H + 2 * KVH) * D, device="cuda", dtype=BF16)
        q = qkv[:, : H * D].view(new, H, D)
        k = qkv[:, H * D : (H + KVH) * D].view(new, KVH, D)
        v = qkv[:, (H + KVH) * D :].view(new, KVH, D)
        causal_flops = 4 * H * D * new * new / 2
        row = {"context": ctx, "new": new, "t_start": time.time()}
        qc, kc, vc = (_heads_first(t).contiguous() for t in (q, k, v))
        calls = {
            "causal, engine layout": (lambda: _cudnn_attention(_heads_first(q), _heads_first(k), _heads_first(v), True, scale),
                                      causal_flops),
            "causal, contiguous": (lambda: _cudnn_attention(qc, kc, vc, True, scale), causal_flops),
        }
        if ctx:
            pk = torch.randn(ctx, KVH, D, device="cuda", dtype=BF16)  # as gather_kv returns it
            pv = torch.randn_like(pk)
            pkc, pvc = _heads_first(pk).contiguous(), _heads_first(pv).contiguous()
            prefix_flops = 4 * H * D * new * ctx
            calls["prefix, engine layout"] = (
                lambda: _cudnn_attention(_heads_first(q), _heads_first(pk), _heads_first(pv), False, scale), prefix_flops)
            calls["prefix, q contiguous"] = (
                lambda: _cudnn_attention(qc, _heads_first(pk), _heads_first(pv), False, scale), prefix_flops)
            calls["prefix, contiguous"] = (lambda: _cudnn_attention(qc, pkc, pvc, False, scale), prefix_flops)
        x = torch.randn(new, hidden, device="cuda", dtype=BF16)
        w = torch.randn(2 * inter, hidden, device="cuda", dtype=BF16) * 0.02
        gemm_flops = 2 * new * hidden * 2 * inter
        calls["gate_up GEMM"] = (lambda: F.linear(x, w), gemm_flops)
        for name, (fn, flops) in calls.items():
            ms = bench_ms(fn)
            ms_b2b = sustained_ms(fn)
            row[f"{name} ms"], row[f"{name} TFLOP/s"] = ms, flops / ms / 1e9
            row[f"{name} b2b ms"], row[f"{name} b2b TFLOP/s"] = ms_b2b, flops / ms_b2b / 1e9
        attn = [fn for name, (fn, _) in calls.items() if name.endswith("engine layout")]

        def layer_like() -> None:
            F.linear(x, w)
            for fn in attn:
                fn()

        alone = sum(row[f"{n} b2b ms"] for n in calls if n.endswith("engine layout") or n == "gate_up GEMM")
        row["GEMM + attention alternating b2b ms"] = sustained_ms(layer_like)
        row["same, sum of b2b alone ms"] = alone
        row["heads-first copy of q ms"] = bench_ms(lambda: _heads_first(q).contiguous())
        row["t_end"] = time.time()
        rows.append(row)
        print_row("layouts", row)
        del qkv, q, k, v, qc, kc, vc, x, w, calls, attn
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ fa3
def section_fa3(rows: list[dict]) -> None:
    """The backend's long-chunk path on cuDNN (causal call, prefix call, merge) against the same backend on
    FlashAttention-3 (one call over the sequence gathered from the cache, causal aligned bottom-right), on one
    paged chunk whose keys are already in the cache, as the engine calls them; beside them FA3 alone on keys
    gathered beforehand, so the gather's share shows. Agreement with each other and, where small enough, with a
    float32 reference. Short chunks also time the Triton kernel, which serves chunks below the threshold."""
    from fa3_fwd_interface import flash_attn_func

    from qwen_serve.layers.attention import gather_kv

    # Every chunk here takes the long-chunk path (threshold 64), so short ones compare it with the kernel.
    cudnn = TritonAttentionBackend(dense_prefill_min_len=64, long_chunk_kernel="cudnn")
    fa3 = TritonAttentionBackend(dense_prefill_min_len=64, long_chunk_kernel="fa3")
    kernel = TritonAttentionBackend(dense_prefill_min_len=None)
    for ctx, new in ((0, 256), (0, 512), (500, 500), (0, 1024), (1000, 1500), (0, 4096), (0, 8192), (0, 16384),
                     (0, 32768), (8192, 8192), (24576, 8192), (98304, 16384), (114688, 16384)):
        b = random_paged_batch([(ctx, new)], H, KVH, D, 16, BF16, "cuda", seed=2)
        write_kv_cache(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
        total = ctx + new
        kf, vf = gather_kv(b.k_cache, b.meta.block_tables[0], total), gather_kv(b.v_cache, b.meta.block_tables[0], total)
        calls = {"cudnn": attention_call(cudnn, b), "fa3": attention_call(fa3, b),
                 "fa3 pre-gathered": lambda: flash_attn_func(b.q[None], kf[None], vf[None], softmax_scale=b.scale,
                                                             causal=True)[0]}
        if total <= 8192:
            calls["triton"] = attention_call(kernel, b)
        row = {"context": ctx, "new": new}
        ours, theirs = calls["cudnn"](), calls["fa3"]()
        row["fa3 vs cudnn max abs"] = (ours.float() - theirs.float()).abs().max().item()
        if total <= 4096:  # float32 reference: SDPA's math path, bottom-right causal mask
            mask = torch.ones(new, total, dtype=torch.bool, device="cuda").tril(ctx)
            ref = F.scaled_dot_product_attention(
                b.q.float().transpose(0, 1), kf.float().transpose(0, 1), vf.float().transpose(0, 1),
                attn_mask=mask, scale=b.scale, enable_gqa=True).transpose(0, 1)
            row["cudnn vs f32 max abs"] = (ours.float() - ref).abs().max().item()
            row["fa3 vs f32 max abs"] = (theirs.float() - ref).abs().max().item()
        flops = 4 * H * D * (new * ctx + new * new / 2)
        for name, fn in calls.items():
            ms, ms_b2b = bench_ms(fn), sustained_ms(fn)
            row[f"{name} ms"], row[f"{name} b2b ms"] = ms, ms_b2b
            row[f"{name} b2b TFLOP/s"] = flops / ms_b2b / 1e9
        rows.append(row)
        print_row("fa3", row)
        del b, kf, vf, calls, ours, theirs
        torch.cuda.empty_cache()


def section_plans(rows: list[dict]) -> None:
    """Each row is a shape not called before in this process: the first call's wall time (host included,
    synchronized) and the steady per-call time. Causal calls stand for a fresh chunk, the others for a
    chunk over a cached prefix."""
    from qwen_serve.kernels.attention import _cudnn_attention, warm_up_dense

    scale = D**-0.5
    if PLAN_WARM_UP:
        torch.cuda.synchronize()
        start = time.perf_counter()
        warm_up_dense(H, KVH, D, BF16, torch.device("cuda"))
        torch.cuda.synchronize()
        rows.append({"warm_up_dense_ms": (time.perf_counter() - start) * 1e3})
        print(f"plans warm-up {rows[-1]['warm_up_dense_ms']:.1f} ms", flush=True)
    shapes = [(True, 4096, 4096), (True, 4100, 4100), (True, 4200, 4200), (True, 6000, 6000), (True, 8192, 8192),
              (False, 8192, 8192), (False, 8192, 8208), (False, 8192, 16384), (False, 4100, 16384),
              (False, 6000, 24576)]
    for causal, n, ctx in shapes:
        q = torch.randn(1, H, n, D, device="cuda", dtype=BF16)
        k = torch.randn(1, KVH, ctx, D, device="cuda", dtype=BF16)
        v = torch.randn_like(k)
        torch.cuda.synchronize()
        start = time.perf_counter()
        _cudnn_attention(q, k, v, causal, scale)
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - start) * 1e3
        steady_ms = bench_ms(lambda: _cudnn_attention(q, k, v, causal, scale))
        rows.append({"causal": causal, "queries": n, "keys": ctx, "first_call_ms": first_ms, "steady_ms": steady_ms,
                     "one_time_ms": first_ms - steady_ms})
        print_row("plans", rows[-1])
        del q, k, v


# ------------------------------------------------------------------------------------------ gemm
def section_gemm(rows: list[dict]) -> None:
    """Whether another cuBLAS choice runs the prefill's GEMMs faster than F.linear on the [out, in] weights."""
    hidden, inter = QWEN7B["hidden_size"], QWEN7B["intermediate_size"]
    shapes = {"qkv": (hidden, (H + 2 * KVH) * D), "o": (hidden, H * D), "gate_up": (hidden, 2 * inter),
              "down": (inter, hidden)}
    blas = torch.backends.cuda
    for m in (8192, 16384, 32768):
        for name, (k, n) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            w = torch.randn(n, k, device="cuda", dtype=BF16) * 0.02  # [out, in], as the model stores it
            wt = w.t().contiguous()  # [in, out]
            flops = 2 * m * k * n
            row = {"rows": m, "gemm": name}

            def rate(fn: Callable[[], object]) -> float:
                return flops / bench_ms(fn) / 1e9

            row["F.linear"] = rate(lambda: F.linear(x, w))
            row["x @ w.T"] = rate(lambda: x @ w.t())
            row["x @ [in,out] copy"] = rate(lambda: x @ wt)
            for lib in ("cublas", "cublaslt"):
                blas.preferred_blas_library(lib)
                row[f"F.linear, {lib}"] = rate(lambda: F.linear(x, w))
            blas.preferred_blas_library("default")
            blas.matmul.allow_bf16_reduced_precision_reduction = False
            row["F.linear, full-precision reduction"] = rate(lambda: F.linear(x, w))
            blas.matmul.allow_bf16_reduced_precision_reduction = True
            rows.append(row)
            print_row("gemm", row)
            del x, w, wt
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ fused
def section_fused(rows: list[dict]) -> None:
    table = torch.randn(40000, D, device="cuda", dtype=torch.float32)
    for tokens in (1, 2048):
        copies = 28 if tokens == 1 else 4
        g = torch.Generator(device="cuda").manual_seed(tokens)
        xs = [torch.randn(tokens, 3584, device="cuda", dtype=BF16, generator=g) for _ in range(copies)]
        rs = [torch.randn(tokens, 3584, device="cuda", dtype=BF16, generator=g) for _ in range(copies)]
        w = torch.randn(3584, device="cuda", dtype=BF16, generator=g)
        gu = [torch.randn(tokens, 2 * 18944, device="cuda", dtype=BF16, generator=g) for _ in range(copies)]
        qkv = [torch.randn(tokens, (H + 2 * KVH) * D, device="cuda", dtype=BF16, generator=g) for _ in range(copies)]
        pos = torch.randint(0, 40000, (tokens,), device="cuda", generator=g)
        cases = {
            "rms_norm+residual": (
                [lambda x=x, r=r: fused.rms_norm(x, r, w, 1e-6) for x, r in zip(xs, rs)],
                [lambda x=x, r=r: rms_norm_reference(x, r, w, 1e-6) for x, r in zip(xs, rs)],
            ),
            "silu_and_mul": (
                [lambda x=x: fused.silu_and_mul(x) for x in gu],
                [lambda x=x: silu_and_mul_reference(x) for x in gu],
            ),
            "rotary": (
                [lambda t=t: fused.rotary(pos, t[:, : H * D], t[:, H * D : (H + KVH) * D], table, D) for t in qkv],
                [lambda t=t: fused.rotary_reference(pos, t[:, : H * D], t[:, H * D : (H + KVH) * D], table, D) for t in qkv],
            ),
        }
        for name, (kernel, reference) in cases.items():
            row = {"op": name, "tokens": tokens, "triton_us": graph_ms(kernel) * 1e3, "torch_us": graph_ms(reference) * 1e3}
            rows.append(row)
            print(f"fused {row}", flush=True)


# ------------------------------------------------------------------------------------------ gemv
def section_gemv(rows: list[dict]) -> None:
    configs = [(8, 512, 4), (4, 512, 4), (8, 256, 4), (4, 256, 2), (8, 512, 8), (16, 512, 4), (4, 1024, 4),
               (8, 1024, 4), (2, 1024, 2), (2, 2048, 4), (1, 2048, 4)]
    shapes = {"qkv_proj": (4608, 3584, True), "o_proj": (3584, 3584, False), "gate_up_proj": (37888, 3584, False),
              "down_proj": (3584, 18944, False), "lm_head": (152064, 3584, False)}
    g = torch.Generator(device="cuda").manual_seed(4)
    total_cublas = total_best = 0.0
    for name, (n, k, has_bias) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, min(28, math.ceil(300e6 / nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=BF16, generator=g) * k**-0.5 for _ in range(copies)]
        bias = torch.randn(n, device="cuda", dtype=BF16, generator=g) if has_bias else None
        x = torch.randn(1, k, device="cuda", dtype=BF16, generator=g)
        row = {"shape": name, "MB": nbytes / 1e6, "floor_us": nbytes / READ_BW * 1e6,
               "cuBLAS_us": graph_ms([lambda w=w: F.linear(x, w, bias) for w in ws]) * 1e3}
        for cfg in configs:
            row[f"gemv{cfg}"] = graph_ms([lambda w=w, c=cfg: fused.gemv(x, w, bias, c) for w in ws]) * 1e3
        best = min((v, key) for key, v in row.items() if key.startswith("gemv"))
        # The model section (run after this one) uses each shape's fastest config.
        fused.GEMV_CONFIGS[(n, k)] = next(c for c in configs if f"gemv{c}" == best[1])
        row["best"], row["best_GBps"] = best[1], nbytes / (best[0] * 1e-6) / 1e9
        row["cuBLAS_GBps"] = nbytes / (row["cuBLAS_us"] * 1e-6) / 1e9
        count = 1 if name == "lm_head" else 28
        total_cublas += row["cuBLAS_us"] * count / 1e3
        total_best += min(best[0], row["cuBLAS_us"]) * count / 1e3
        rows.append(row)
        print(f"gemv {row}", flush=True)
        del ws
        if name != "lm_head":  # the FP8 method leaves the lm_head in bfloat16
            rows.append(_gemv_fp8_row(name, n, k, has_bias, g))
    rows.append({"shape": "all matmuls of a decode step", "cuBLAS_ms": total_cublas, "best_of_both_ms": total_best,
                 "configs_used_by_model": {f"{n}x{k}": c for (n, k), c in fused.GEMV_CONFIGS.items()},
                 "fp8_configs_used_by_model": {f"{n}x{k}": c for (n, k), c in fused.FP8_GEMV_CONFIGS.items()}})


def _gemv_fp8_row(name: str, n: int, k: int, has_bias: bool, g: torch.Generator) -> dict:
    """One row through the FP8 method's two paths: the GEMV on float8 weights (each config) and torch's
    scaled matmul with the activations quantized (what more rows take)."""
    from qwen_serve.kernels import fp8

    configs = [(4, 1024, 4), (8, 1024, 4), (4, 2048, 4), (2, 2048, 4), (8, 512, 4), (16, 1024, 8), (4, 512, 4),
               (8, 2048, 8), (2, 1024, 2)]
    nbytes = n * k
    copies = max(2, min(28, math.ceil(300e6 / nbytes)))
    ws = [fp8.quantize_weight(torch.randn(n, k, device="cuda", dtype=BF16, generator=g)) for _ in range(copies)]
    bias = torch.randn(n, device="cuda", dtype=BF16, generator=g) if has_bias else None
    x = torch.randn(1, k, device="cuda", dtype=BF16, generator=g)
    row = {"shape": f"{name} fp8", "MB": nbytes / 1e6, "floor_us": nbytes / READ_BW * 1e6,
           "scaled_mm_us": graph_ms([lambda w=w, s=s: fp8.linear(x, w, s, bias) for w, s in ws]) * 1e3}
    for cfg in configs:
        row[f"gemv{cfg}"] = graph_ms([lambda w=w, s=s, c=cfg: fused.gemv(x, w, bias, c, scale=s) for w, s in ws]) * 1e3
    best = min((v, key) for key, v in row.items() if key.startswith("gemv"))
    fused.FP8_GEMV_CONFIGS[(n, k)] = next(c for c in configs if f"gemv{c}" == best[1])
    row["best"], row["best_GBps"] = best[1], nbytes / (best[0] * 1e-6) / 1e9
    print(f"gemv {row}", flush=True)
    return row


# ------------------------------------------------------------------------------------------ model
class DecodeRunner:
    """A model bound to a paged KV cache; sequences own contiguous block ranges (slot = base + position)."""

    def __init__(self, model, cfg: ModelConfig, batch: int, max_len: int, backend, block_size: int = 16) -> None:
        self.model, self.cfg, self.batch, self.max_len, self.bs = model, cfg, batch, max_len, block_size
        self.blocks_per_seq = triton.cdiv(max_len, block_size)
        self.kv = torch.empty(
            2, cfg.num_hidden_layers, batch * self.blocks_per_seq, block_size, cfg.num_key_value_heads, cfg.head_dim,
            dtype=BF16, device="cuda",
        )
        self.kv.normal_()  # stands for prompts when the benchmark does not prefill them
        bind_kv_cache(model, self.kv, backend)
        self.tables = torch.arange(batch * self.blocks_per_seq, dtype=torch.int32, device="cuda").view(batch, -1)

    def meta(self, seq: int, start: int, end: int) -> AttentionMetadata:
        slots = torch.arange(start, end, device="cuda") + seq * self.blocks_per_seq * self.bs
        return AttentionMetadata(
            [0, end - start], [end], slots, self.tables[seq : seq + 1], end - start, end,
            torch.tensor([0, end - start], dtype=torch.int32, device="cuda"),
            torch.tensor([end], dtype=torch.int32, device="cuda"),
        )

    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """Sequence 0's prompt in chunks; returns the greedy next token (what TTFT measures)."""
        n = ids.shape[0]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            with forward_context(self.meta(0, s, e)):
                hidden = self.model(ids[s:e], torch.arange(s, e, device="cuda"))
        return self.model.compute_logits(hidden[-1:]).argmax(-1)

    def decode_ms(self, context: int, steps: int) -> float:
        """ms per decode step of all `batch` sequences at `context` cached tokens, from a CUDA graph."""
        b = self.batch
        ids = torch.randint(0, self.cfg.vocab_size, (b,), device="cuda")
        pos = torch.full((b,), context, dtype=torch.long, device="cuda")
        base = torch.arange(b, device="cuda") * self.blocks_per_seq * self.bs
        slots = base + context
        seq_lens = torch.full((b,), context + 1, dtype=torch.int32, device="cuda")
        meta = AttentionMetadata(
            list(range(b + 1)), [context + 1] * b, slots, self.tables, 1, self.max_len,
            torch.arange(b + 1, dtype=torch.int32, device="cuda"), seq_lens,
        )

        def step() -> None:
            with forward_context(meta):
                hidden = self.model(ids, pos)
            ids.copy_(self.model.compute_logits(hidden).argmax(-1))
            pos.add_(1)
            slots.add_(1)
            seq_lens.add_(1)

        def reset() -> None:
            pos.fill_(context)
            slots.copy_(base + context)
            seq_lens.fill_(context + 1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
            step()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        reset()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        if int(pos[0]) != context + steps + 1 or not bool((ids >= 0).all()):
            raise RuntimeError("decode graph did not advance as expected")
        del graph
        return start.elapsed_time(end) / steps


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def set_fused(model: torch.nn.Module, kinds: tuple[type, ...], on: bool) -> None:
    """Turns the fused kernels of the layers of these kinds on or off (each layer's own choice)."""
    for m in model.modules():
        if isinstance(m, kinds):
            m.fused = on


def section_model(rows: list[dict]) -> None:
    cfg = ModelConfig.from_dict(QWEN7B)
    model = build_model(cfg, BF16, "cuda")
    random_weights(model, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {weight_bytes / 1e9:.2f} GB of weights; roofline {READ_BW / weight_bytes:.1f} tok/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)

    # Batch-1 decode, prompt 128 + 256 new: every kernel on, then cuBLAS for the projections, then
    # torch for RMSNorm and SwiGLU too (RoPE and the cache write stay fused: the torch write syncs the
    # host, which a CUDA graph cannot capture).
    linears, elementwise = (LinearBase, VocabEmbedding), (RMSNorm, SiluAndMul)
    for label, off in (("all kernels", ()), ("cuBLAS projections", linears),
                       ("cuBLAS + torch elementwise", linears + elementwise)):
        backend = TritonAttentionBackend()
        if off:
            set_fused(model, off, False)
        try:
            torch.cuda.reset_peak_memory_stats()
            runner = DecodeRunner(model, cfg, 1, 128 + 256 + 16, backend)
            ids = torch.randint(0, cfg.vocab_size, (128,), device="cuda", generator=gen)
            runner.prefill(ids, 128)
            ms = runner.decode_ms(128, 256)
            rows.append({"figure": f"decode b=1 prompt128+256 ({label})", "ms_per_step": ms, "tok_s": 1e3 / ms,
                         "roofline_tok_s": READ_BW / weight_bytes, "peak_GB": torch.cuda.max_memory_allocated() / 1e9})
            print(rows[-1], flush=True)
            del runner
        finally:
            set_fused(model, linears + elementwise, True)
        torch.cuda.empty_cache()

    # TTFT and decode at long contexts.
    for n in (4096, 8192, 16384, 32768):
        torch.cuda.reset_peak_memory_stats()
        runner = DecodeRunner(model, cfg, 1, n + 80, TritonAttentionBackend())
        ids = torch.randint(0, cfg.vocab_size, (n,), device="cuda", generator=gen)
        for chunk in sorted({min(n, 8192), n}):
            runner.prefill(ids, chunk)  # warm-up: compiles this shape
            ms = timed(lambda: runner.prefill(ids, chunk))
            rows.append({"figure": f"TTFT {n} (chunk {chunk})", "ms": ms, "peak_GB": torch.cuda.max_memory_allocated() / 1e9})
            print(rows[-1], flush=True)
        context = min(n, cfg.max_context - 80)  # positions must stay inside the RoPE table
        ms = runner.decode_ms(context, 64)
        rows.append({"figure": f"decode b=1 at {context}", "ms_per_step": ms, "tok_s": 1e3 / ms})
        print(rows[-1], flush=True)
        del runner
        torch.cuda.empty_cache()

    # Batch-64 decode (random cache standing for the prompts).
    for ctx in (1024, 4096):
        runner = DecodeRunner(model, cfg, 64, ctx + 80, TritonAttentionBackend())
        ms = runner.decode_ms(ctx, 32)
        rows.append({"figure": f"decode b=64 at {ctx}", "ms_per_step": ms, "tok_s": 64e3 / ms})
        print(rows[-1], flush=True)
        del runner
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()

    # 131,072 tokens with YaRN: chunked prefill, then decode.
    ycfg = cfg.with_yarn()
    model = build_model(ycfg, BF16, "cuda")
    random_weights(model, seed=0)
    n = 131072 - 80
    torch.cuda.reset_peak_memory_stats()
    runner = DecodeRunner(model, ycfg, 1, 131072, TritonAttentionBackend())
    ids = torch.randint(0, ycfg.vocab_size, (n,), device="cuda", generator=gen)
    runner.prefill(ids[:16384], 16384)  # compile
    ms = timed(lambda: runner.prefill(ids, 16384))
    rows.append({"figure": f"TTFT {n} YaRN (chunk 16384)", "ms": ms, "peak_GB": torch.cuda.max_memory_allocated() / 1e9})
    print(rows[-1], flush=True)
    ms = runner.decode_ms(n, 64)
    rows.append({"figure": f"decode b=1 at {n} YaRN", "ms_per_step": ms, "tok_s": 1e3 / ms})
    print(rows[-1], flush=True)


def section_pdl(rows: list[dict]) -> None:
    """Batch-1 decode (prompt 128 + 256) from a CUDA graph with programmatic dependent launch off and on."""
    cfg = ModelConfig.from_dict(QWEN7B)
    model = build_model(cfg, BF16, "cuda")
    random_weights(model, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (128,), device="cuda", generator=gen)
    before = os.environ.get("QWEN_SERVE_PDL")
    try:
        for setting in ("0", "1", "0", "1"):  # alternated, so drift shows up as a difference between repeats
            os.environ["QWEN_SERVE_PDL"] = setting
            runner = DecodeRunner(model, cfg, 1, 128 + 256 + 16, TritonAttentionBackend())
            runner.prefill(ids, 128)
            ms = runner.decode_ms(128, 256)
            rows.append({"figure": f"decode b=1 prompt128+256 (PDL {'on' if setting == '1' else 'off'})",
                         "ms_per_step": ms, "tok_s": 1e3 / ms, "roofline_tok_s": READ_BW / weight_bytes})
            print(rows[-1], flush=True)
            del runner
            torch.cuda.empty_cache()
    finally:
        if before is None:
            os.environ.pop("QWEN_SERVE_PDL", None)
        else:
            os.environ["QWEN_SERVE_PDL"] = before


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print(f"\n## {title}\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--no-plan-warm-up", action="store_true", help="plans: measure without the warm-up")
    parser.add_argument("--sections", default="attn,attnmix,prefill,chunked,fused,gemv,model,pdl")
    args = parser.parse_args()
    global PLAN_WARM_UP
    PLAN_WARM_UP = not args.no_plan_warm_up
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    results: dict = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__}
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    results["copy_GBps"] = 2 * x.numel() / (bench_ms(lambda: y.copy_(x)) * 1e-3) / 1e9
    del x, y
    print(results, flush=True)
    sections = {"attn": section_attn, "attnmix": section_attnmix, "prefill": section_prefill,
                "chunked": section_chunked, "plans": section_plans, "fused": section_fused, "gemv": section_gemv, "model": section_model,
                "pdl": section_pdl, "gemm": section_gemm, "layouts": section_layouts, "fa3": section_fa3}
    for name in args.sections.split(","):
        rows: list[dict] = []
        t = time.perf_counter()
        try:
            with torch.no_grad():
                sections[name](rows)
        except Exception:
            traceback.print_exc()
            rows.append({"error": traceback.format_exc(limit=3)[-400:]})
        results[name] = rows
        results[f"{name}_seconds"] = time.perf_counter() - t
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_kernels.json").write_text(json.dumps(results, indent=1))
    for name in args.sections.split(","):
        print_table(name, [r for r in results[name] if "error" not in r])


if __name__ == "__main__":
    main()
