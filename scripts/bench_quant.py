"""The dequantize-matmul paths (kernels/quant_linear.py) on the Qwen2.5-7B shapes, beside cuBLAS in bfloat16:
quant_linear's own choice ("quant_linear": the GEMV at one row, `mm_config`'s tensor-core tiles up to
MM_MAX_ROWS rows), the tensor-core kernel at each tile setting below, dequantize + cuBLAS at every row count
(beyond MM_MAX_ROWS rows at each of DEQUANT's settings), and (4 bits) torch's packed int4 matmul (tinygemm)
at two of its K tilings, int4pack's one-row GEMV on the same layout at each of INT4PACK_GEMV's settings (with
PDL as served, and without: PDL lets each of the timed back-to-back calls start under the one before), its
tensor-core kernel at each of INT4PACK_MM's settings (1-512 rows), `int4pack.linear` as served, and the
dequantization of its layout (kernels/int4pack.py) for cuBLAS (beyond MM_MAX_ROWS rows at each of
INT4PACK_DEQUANT's settings), and FP8 W8A8 (kernels/fp8.py: the activations'
per-token quantization included). Fixed seeds; CUDA only. `--paths` times only the paths named.

  python3 scripts/bench_quant.py --out run.json
Rows: op (shape), rows M, path/setting, ms (median of CUDA-graph replays; each call after L2 is filled with
other data, as a served layer finds it, unless --warm), effective GB/s (weight bytes read); printed: the best
setting of each path.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from qwen_serve.kernels import fp8, int4pack
from qwen_serve.kernels import quant_linear as ql

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, SPLIT_K); BLOCK_M is set from the row count.
MM = [(0, bn, bk, w, split) for bn in (64, 128) for bk in (128,) for w in (4,) for split in (1, 2, 4, 8)]
# (BLOCK_N, CHUNKS, warps) of quant_linear's dequantize pass; (k-tiles a program, warps) of int4pack's.
DEQUANT = [(bn, c, w) for bn in (8, 16, 32) for c in (4, 8, 16) for w in (4, 8)]
INT4PACK_DEQUANT = [(t, w) for t in (1, 2, 4, 8) for w in (2, 4, 8)]
# (BLOCK_M, BLOCK_N, warps, SPLIT_K) of int4pack's tensor-core kernel; BLOCK_M 0: the row count's.
INT4PACK_MM = [(bm, bn, w, split) for bm in (0, 128) for bn, w in ((64, 4), (128, 4), (128, 8)) for split in (1, 2, 4, 8)]
# (outputs, k-tiles a step, warps) of int4pack's GEMV: run 82's sweep.
INT4PACK_GEMV = [(8, 8, 1), (4, 8, 1), (4, 16, 2), (4, 32, 4), (8, 16, 1), (2, 32, 2), (8, 16, 2), (8, 4, 1), (4, 4, 1),
                 (2, 16, 1), (8, 32, 4)]


# Read between the timed calls (unless --warm) so that each finds its weights in memory, not L2, as a served
# model's layers do. Timed back to back, a layer of up to ~40 MB stays in an H100's 50 MB L2: the engine's INT4
# decode steps of 129-256 sequences took ~1.9x what such timings predicted (BENCHMARKS.md, runs 68-69).
EVICT: torch.Tensor | None = None


def _replay_ms(calls, reps: int) -> float:
    """Median ms of `reps` rounds of `calls`, captured in one CUDA graph (no launch gaps)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one call of `fn`; unless --warm, after a read of three times L2's size before each call (the
    time of the reads alone, timed the same way, taken off). Reads leave L2's lines clean, so evicting them
    costs the timed call nothing; what a served kernel gains from PDL (starting under the kernel before it)
    is lost here, since the reads are a torch kernel."""
    fn()
    torch.cuda.synchronize()
    if EVICT is None:
        return _replay_ms([fn], reps)
    evict = EVICT.sum
    return _replay_ms([evict, fn], reps) - _replay_ms([evict], reps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="1,4,16,64,256,8192")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--paths", default="", help="comma-separated path names to time (default: all)")
    parser.add_argument("--warm", action="store_true",
                        help="time calls back to back, weights left in L2 by the call before (runs up to 67)")
    args = parser.parse_args()
    if not args.warm:
        global EVICT
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        EVICT = torch.zeros(3 * l2 // 4, dtype=torch.int32, device="cuda")
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
            settings = [("dequant+cublas", t) for t in (DEQUANT if m > ql.MM_MAX_ROWS else [ql.DEQUANT_TILES])]
            if m <= ql.MM_MAX_ROWS:
                block_m = ql.mm_config(m, n, k, 128)[0]
                settings += [("quant_linear", None)] + [("mm", (block_m,) + c[1:]) for c in MM]
            if args.bits == 4:
                settings += [("tinygemm", tiles) for tiles in (4, 8)] + [("int4pack-dequant+cublas", t) for t in (
                    INT4PACK_DEQUANT if m > ql.MM_MAX_ROWS else [int4pack.DEQUANT_TILES])]
                if m == 1:
                    settings += [("int4pack-gemv", t) for t in INT4PACK_GEMV]
                    settings += [("int4pack-gemv-nopdl", t) for t in INT4PACK_GEMV]
                    settings += [("tinygemm+bias", 8)]  # as before run 55
                settings += [("int4pack-linear", None)]  # as served
                if m <= 512:
                    block_m = next(b for b in (16, 32, 64, 128, 256) if m <= b or b == 256)
                    mm_settings = [(min(bm or block_m, block_m), *c) for bm, *c in INT4PACK_MM]
                    # 256 rows x 128 outputs: only 8 warps hold the accumulator
                    settings += [("int4pack-mm", c) for c in mm_settings if c[0] < 256 or c[1:3] != (128, 4)]
            settings = list(dict.fromkeys((p, c) for p, c in settings if not args.paths or p in args.paths.split(",")))
            packs = {}  # INNER_K_TILES -> int4pack.pack's tensors, made once per shape

            def packed_as(tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
                if tiles not in packs:
                    served, int4pack.INNER_K_TILES = int4pack.INNER_K_TILES, tiles
                    packs[tiles] = int4pack.pack(ql.unpack_codes(qweight, 4), zeros, scales, torch.bfloat16)
                    int4pack.INNER_K_TILES = served
                return packs[tiles]

            for path, c in settings:
                kw = {"config": c} if path == "mm" else {}  # quant_linear: its own choice
                try:
                    if path.startswith("tinygemm"):
                        packed, sz = packed_as(c)
                        torchs = int4pack.torchs_order(packed)
                        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
                        mm = lambda: torch.ops.aten._weight_int4pack_mm(x, torchs, 128, sz)  # noqa: E731
                        ms = graph_ms((lambda: mm() + bias) if path == "tinygemm+bias" else mm)
                    elif path == "int4pack-mm":
                        packed, sz = packed_as(8)
                        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
                        ms = graph_ms(lambda: int4pack.mm(x, packed, 128, sz, bias, c))
                    elif path.startswith("int4pack-gemv") or path == "int4pack-linear":
                        packed, sz = packed_as(8)
                        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
                        pdl = os.environ.get("QWEN_SERVE_PDL")
                        os.environ["QWEN_SERVE_PDL"] = "0" if path.endswith("nopdl") else pdl or "1"
                        try:
                            if path == "int4pack-linear":
                                ms = graph_ms(lambda: int4pack.linear(x, packed, 128, sz, bias))
                            else:
                                ms = graph_ms(lambda: int4pack.gemv(x, packed, 128, sz, bias, c))
                        finally:  # the caller's setting back for the other paths
                            os.environ.pop("QWEN_SERVE_PDL") if pdl is None else os.environ.update(QWEN_SERVE_PDL=pdl)
                    elif path == "int4pack-dequant+cublas":
                        packed, sz = packed_as(8)
                        ms = graph_ms(lambda: F.linear(x, int4pack.dequantize(packed, sz, 128, c)))
                    elif path == "dequant+cublas":
                        ms = graph_ms(lambda: F.linear(
                            x, ql.dequantize(qweight, zeros, scales, 128, args.bits, x.dtype, c)))
                    else:
                        ms = graph_ms(lambda: ql.quant_linear(x, qweight, zeros, scales, 128, args.bits, None, **kw))
                except Exception as e:  # a tile setting that does not fit this GPU
                    rows.append({"op": op, "rows": m, "path": path, "config": c, "error": str(e)[:200]})
                    continue
                rows.append({"op": op, "rows": m, "path": path, "config": c,
                             "ms": ms, "GB_s": qbytes / ms / 1e6})
            w8, s8 = fp8.quantize_weight(w16)
            ms = graph_ms(lambda: fp8.linear(x, w8, s8, None))
            rows.append({"op": op, "rows": m, "path": "fp8-scaled-mm", "ms": ms, "GB_s": n * k / ms / 1e6})
            here = [r for r in rows if r["op"] == op and r["rows"] == m and "ms" in r]
            best = {}
            for r in here:
                if r["path"] not in best or r["ms"] < best[r["path"]]["ms"]:
                    best[r["path"]] = r
            print(f"{op:8s} M={m:5d}  " + "  ".join(f"{p} {r.get('config') or ''} {r['ms']*1e3:.1f} us ({r['GB_s']:.0f} GB/s)"
                                                  for p, r in best.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
