"""The dequantize-matmul paths (kernels/quant_linear.py) on the Qwen2.5-7B shapes, beside cuBLAS in bfloat16:
every GEMV tile setting below at decode's row counts, dequantize + cuBLAS beyond. Fixed seeds; CUDA only.

  python3 scripts/bench_quant.py --out run.json
Rows: op (shape), rows M, path/setting, ms (median of CUDA-graph replays), effective GB/s (weight bytes read).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from qwen_serve.kernels import quant_linear as ql

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
GEMV = [(bn, bkw, w) for bn in (4, 8, 16) for bkw in (32, 64, 128) for w in (4, 8)]


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one call, timed as `reps` calls captured in a CUDA graph (no launch gaps)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="1,4,16,64,256,8192")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for op, (n, k) in SHAPES.items():
        qweight = torch.randint(-2**31, 2**31 - 1, (n, k * args.bits // 32), dtype=torch.int32, device="cuda", generator=gen)
        zeros = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda", generator=gen)
        scales = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.01).half()
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        qbytes = qweight.numel() * 4 + zeros.numel() + scales.numel() * 2
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            ms = graph_ms(lambda: F.linear(x, w16))
            rows.append({"op": op, "rows": m, "path": "cublas-bf16", "ms": ms, "GB_s": n * k * 2 / ms / 1e6})
            settings = [("gemv", c) for c in GEMV] if m <= ql.GEMV_MAX_ROWS else [("dequant+cublas", None)]
            for path, c in settings:
                kw = {} if c is None else {f"{path}_config": c}
                try:
                    ms = graph_ms(lambda: ql.quant_linear(x, qweight, zeros, scales, 128, args.bits, None, **kw))
                except Exception as e:  # a tile setting that does not fit this GPU
                    rows.append({"op": op, "rows": m, "path": path, "config": c, "error": str(e)[:200]})
                    continue
                rows.append({"op": op, "rows": m, "path": path, "config": c, "ms": ms, "GB_s": qbytes / ms / 1e6})
            best = min((r for r in rows if r["op"] == op and r["rows"] == m and r["path"] != "cublas-bf16"
                        and "ms" in r), key=lambda r: r["ms"])
            cublas = next(r for r in rows if r["op"] == op and r["rows"] == m and r["path"] == "cublas-bf16")
            print(f"{op:8s} M={m:5d}  cuBLAS bf16 {cublas['ms']*1e3:8.1f} us  best {best['path']} {best.get('config')} "
                  f"{best['ms']*1e3:8.1f} us  ({best['GB_s']:.0f} GB/s)", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
