"""A Triton kernel's SASS for a GPU that is not here: compiles it for sm_90 (or --arch) with the Triton installed, no
GPU needed, and counts its instructions, those of each loop body above all. For the lent device's compiler, install
its Triton beside yours first and put it first on the path:

    python3 -m pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python3 scripts/sass_offline.py qwen_serve.kernels.int4pack _gemv_kernel \\
        --types x_ptr=*i32 w_ptr=*i32 sz_ptr=*i32 b_ptr=*bf16 y_ptr=*bf16 N=i32 K=i32 \\
        --const GROUP=128 WORDS=4 HAS_BIAS=0 ROWS=8 TILES=4 PARTS=1 EVEN=1 LOP3=1 USE_PDL=1 --warps 2

Arguments not named in --const are runtime arguments and need a --types entry. Each one is taken as divisible by
16 (pointers: 16-byte aligned), as Triton specializes them at a launch whose tensors are aligned; without that,
no load is vectorized and the counts mislead. --unaligned NAME drops it for NAME. Constants: integers (0/1 for
booleans). The numbers are the compiler's, not the card's: only a device run says what is faster.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def compile_sass(module: str, kernel: str, types: dict[str, str], consts: dict[str, int], warps: int, arch: int,
                 unaligned: set[str]) -> tuple[str, str]:
    """(SASS text, TTGIR text) of `kernel` compiled for sm_`arch`."""
    fn = getattr(importlib.import_module(module), kernel)
    missing = [a for a in fn.arg_names if a not in types and a not in consts]
    if missing:
        raise SystemExit(f"no --types or --const for {', '.join(missing)}")
    signature = {a: types.get(a, "constexpr") for a in fn.arg_names}
    constexprs = {(fn.arg_names.index(a),): v for a, v in consts.items()}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, t in types.items() if a not in unaligned and (t.startswith("*") or t in ("i32", "i64"))}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    return sass, compiled.asm["ttgir"]


def opcodes(lines: list[str]) -> collections.Counter:
    return collections.Counter(m.group(1) for line in lines if (m := _INSTRUCTION.match(line)))


def loop_bodies(sass: str) -> list[list[str]]:
    """The instructions between each label and the last branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    bodies = []
    for label, start in labels.items():
        ends = [i for i, line in enumerate(lines) if i > start and f"BRA `({label})" in line]
        if ends and ends[-1] > start + 1:  # not the one-instruction trap after the exit
            bodies.append(lines[start:ends[-1] + 1])
    return bodies


def summary(counts: collections.Counter) -> str:
    total = sum(counts.values())
    loads = {op: n for op, n in counts.items() if op.startswith(("LDG", "LDS", "STS", "LDL", "STL", "BAR"))}
    top = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
    return f"{total} instructions; memory and barriers {dict(sorted(loads.items()))}; most: {top}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module")
    parser.add_argument("kernel")
    parser.add_argument("--types", nargs="*", default=[], metavar="ARG=TYPE",
                        help="runtime arguments: *i32, *bf16, i32 ...")
    parser.add_argument("--const", nargs="*", default=[], metavar="ARG=INT")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--unaligned", nargs="*", default=[])
    parser.add_argument("--out", help="write the SASS here")
    parser.add_argument("--ttgir", help="write Triton's GPU IR here (the layouts it chose)")
    args = parser.parse_args()
    consts = {k: int(v) for k, v in _pairs(args.const).items()}
    sass, ttgir = compile_sass(args.module, args.kernel, _pairs(args.types), consts, args.warps, args.arch,
                           set(args.unaligned))
    if args.out:
        Path(args.out).write_text(sass)
    if args.ttgir:
        Path(args.ttgir).write_text(ttgir)
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.warps} warps")
    print("kernel:", summary(opcodes(sass.splitlines())))
    for i, body in enumerate(loop_bodies(sass)):
        print(f"loop {i}:", summary(opcodes(body)))


if __name__ == "__main__":
    main()
