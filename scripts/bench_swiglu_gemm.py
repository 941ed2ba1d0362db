"""Experiment, kept for its figures (docs/gpu-notes.md v13, run 24): the MLP's gate_up projection with SwiGLU
in its epilogue as one Triton kernel (pointer loads, TMA descriptors, persistent TMA), against what the model
runs (cuBLAS F.linear, then the silu_and_mul kernel). W is the merged [2I, K] weight: gate rows, then up rows.
Fusing would save the pass over the [M, 2I] product (~24 ms of a 32K prefill), but only if the GEMM kept
cuBLAS's rate; on the H200 the best variant ran 16% slower than the two calls together, so the model keeps them.
Correctness against a float32 reference, TFLOP/s by do_bench and back to back, JSON to $OUT/mlp_bench.json.

    PYTHONPATH=$PWD OUT=/tmp/out python scripts/bench_swiglu_gemm.py
"""
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench_kernels import bench_ms, sustained_ms  # this script's directory is first on sys.path
from qwen_serve.kernels import fused


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _swiglu_ptr_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    g_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    u_ptrs = g_ptrs + N.to(tl.int64) * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        a = tl.load(x_ptrs)
        acc_g = tl.dot(a, tl.trans(tl.load(g_ptrs)), acc_g)
        acc_u = tl.dot(a, tl.trans(tl.load(u_ptrs)), acc_u)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    out = acc_g * tl.sigmoid(acc_g) * acc_u
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + om[:, None].to(tl.int64) * stride_om + on[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(om[:, None] < M) & (on[None, :] < N))


@triton.jit
def _swiglu_tma_kernel(x_desc, g_desc, u_desc, out_desc, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        a = x_desc.load([off_m, k])
        acc_g = tl.dot(a, g_desc.load([off_n, k]).T, acc_g)
        acc_u = tl.dot(a, u_desc.load([off_n, k]).T, acc_u)
    out = acc_g * tl.sigmoid(acc_g) * acc_u
    out_desc.store([off_m, off_n], out.to(out_desc.dtype))


@triton.jit
def _swiglu_tma_persistent_kernel(x_desc, g_desc, u_desc, out_desc, M, N, K,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            acc_g = tl.dot(a, g_desc.load([off_n, ki * BLOCK_K]).T, acc_g)
            acc_u = tl.dot(a, u_desc.load([off_n, ki * BLOCK_K]).T, acc_u)
        out = acc_g * tl.sigmoid(acc_g) * acc_u
        out_desc.store([off_m, off_n], out.to(out_desc.dtype))


def swiglu_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(x.float(), w.float()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def swiglu_gemm(x, w, kind="ptr", block_m=128, block_n=128, block_k=64, group_m=8, warps=8, stages=4, programs=None):
    """silu(x @ gate.T) * (x @ up.T) for x [M, K] and the merged w [2N, K], by one of the three kernels ("ptr",
    "tma", "persistent"). `programs` sets the persistent grid (default: the SM count; the interpreter has none)."""
    M, K = x.shape
    N = w.shape[0] // 2
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if kind == "ptr":
        _swiglu_ptr_kernel[(tiles,)](x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                                     NUM_STAGES=stages, num_warps=warps)
        return out
    xd = TensorDescriptor.from_tensor(x, [block_m, block_k])
    gd = TensorDescriptor.from_tensor(w[:N], [block_n, block_k])
    ud = TensorDescriptor.from_tensor(w[N:], [block_n, block_k])
    od = TensorDescriptor.from_tensor(out, [block_m, block_n])
    if kind == "tma":
        _swiglu_tma_kernel[(tiles,)](xd, gd, ud, od, M, N, K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                     GROUP_M=group_m, NUM_STAGES=stages, num_warps=warps)
    else:
        progs = min(tiles, programs or torch.cuda.get_device_properties(x.device).multi_processor_count)
        _swiglu_tma_persistent_kernel[(progs,)](xd, gd, ud, od, M, N, K, BLOCK_M=block_m, BLOCK_N=block_n,
                                                BLOCK_K=block_k, GROUP_M=group_m, NUM_STAGES=stages,
                                                NUM_PROGRAMS=progs, num_warps=warps)
    return out



K, I = 3584, 18944  # Qwen2.5-7B: hidden, intermediate
# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, warps, GROUP_M, stages)
CONFIGS = [
    ("ptr", 128, 128, 64, 8, 8, 3), ("ptr", 128, 128, 64, 8, 8, 4), ("ptr", 128, 64, 64, 8, 4, 4),
    ("ptr", 128, 64, 64, 8, 8, 4), ("ptr", 64, 128, 64, 8, 4, 4), ("ptr", 128, 128, 32, 8, 8, 5),
    ("tma", 128, 128, 64, 8, 8, 3), ("tma", 128, 128, 64, 8, 8, 4), ("tma", 128, 64, 64, 8, 4, 4),
    ("tma", 128, 64, 64, 8, 8, 4), ("tma", 128, 128, 32, 8, 8, 5), ("tma", 64, 128, 64, 8, 4, 4),
    ("persistent", 128, 128, 64, 8, 8, 3), ("persistent", 128, 128, 64, 8, 8, 4),
    ("persistent", 128, 64, 64, 8, 8, 4), ("persistent", 128, 64, 64, 8, 4, 4),
]


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    torch.manual_seed(0)
    rows = []
    for m in (8192, 16384, 2048):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2 * I, K, device="cuda", dtype=torch.bfloat16) * 0.02
        flops = 2 * m * K * 2 * I
        ref = swiglu_reference(x, w).float()

        def two_calls() -> torch.Tensor:
            return fused.silu_and_mul(F.linear(x, w))

        got = two_calls().float()
        row = {"M": m, "cublas+silu rel err": ((got - ref).norm() / ref.norm()).item(),
               "cublas alone ms": bench_ms(lambda: F.linear(x, w)), "cublas+silu ms": bench_ms(two_calls),
               "cublas+silu b2b ms": sustained_ms(two_calls)}
        print(row, flush=True)
        for kind, bm, bn, bk, warps, group, stages in CONFIGS:
            name = f"{kind} {bm}x{bn}x{bk} w{warps} g{group} s{stages}"
            try:
                def fn() -> torch.Tensor:
                    return swiglu_gemm(x, w, kind, bm, bn, bk, group, warps, stages)

                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = bench_ms(fn)
                row[name] = {"ms": ms, "b2b_ms": sustained_ms(fn), "TFLOPs": flops / ms / 1e9, "rel_err": err}
            except Exception as e:  # a configuration that does not compile is a result too
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(m, name, row[name], flush=True)
        rows.append(row)
        with open(os.path.join(out_dir, "mlp_bench.json"), "w") as f:
            json.dump(rows, f, indent=1)
        del x, w, ref
        torch.cuda.empty_cache()
    for r in rows:
        best_ms, best = min((v["ms"], k) for k, v in r.items() if isinstance(v, dict) and "ms" in v)
        print(f"M={r['M']}: cublas {r['cublas alone ms']:.3f} ms, cublas+silu {r['cublas+silu ms']:.3f} "
              f"(b2b {r['cublas+silu b2b ms']:.3f}); best fused {best} {best_ms:.3f} ms "
              f"(b2b {r[best]['b2b_ms']:.3f}, err {r[best]['rel_err']:.2e})")


if __name__ == "__main__":
    main()
