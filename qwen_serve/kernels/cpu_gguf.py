"""GGUF linears on the CPU computed from the file's own blocks (cpu_gguf.cpp), as llama.cpp's CPU backend does.

torch ships no CPU kernel for GGUF's 5-, 6- and 8-bit blocks, so without this file those layers are
dequantized to bfloat16 at load: 2.9x the bytes of Q5_0 read by every decode step, and 2 bytes a weight held.
The kernels round the activations to int8 in blocks of 32 (one float scale a block, `quantize_reference`)
and take integer dot products with each block's codes (AVX2, VNNI where the CPU has it). That rounding is
the only difference from the exact weights: each output moves by at most sum(|w| * d / 2) over its inputs,
d the block's activation scale (tests/test_cpu_gguf.py checks that bound and the kernels against
`linear_reference`).

The C++ source is compiled once per machine at first use (torch's extension builder, for the CPU it runs
on: `-march=native`; ~20 s on 2 cores, cached under TORCH_EXTENSIONS_DIR). Where it cannot be built (no
compiler, no AVX2) `available()` is False and the layers keep the dequantized path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Block formats the kernels read, by the id cpu_gguf.cpp's `Type` gives them.
TYPE_IDS = {"Q4_0": 0, "Q5_0": 1, "Q8_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# Values an activation scale covers.
ACTIVATION_BLOCK = 32


def _cpu_id() -> str:
    """A short hash of this CPU's instruction-set flags: a build for one CPU's "native" is cached under its own
    name, so a home directory shared by machines of different CPUs never loads another's (illegal
    instructions)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() + torch.backends.cpu.get_cpu_capability()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


# A build cut short (Ctrl-C at the first start, a killed process) leaves torch's lock file in the build folder,
# and every later start would wait on it forever (torch's FileBaton has no timeout): a lock older than any
# build takes is removed.
STALE_LOCK_S = 600


def remove_stale_lock(build_dir: Path, now: float | None = None) -> bool:
    lock = build_dir / "lock"
    try:
        if (time.time() if now is None else now) - lock.stat().st_mtime <= STALE_LOCK_S:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    log.warning("removed %s, left by a build of the GGUF CPU kernels that did not finish", lock)
    return True


@functools.lru_cache(maxsize=None)
def build(arch: str = "native"):
    """The kernels compiled for `arch` (gcc's -march: "native" serves; the tests also build "haswell", AVX2
    without AVX-512 or VNNI, so that the fallback paths run on any machine), or None with the reason logged
    where they cannot be built here."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):  # "AVX2" / "AVX512": torch's own dispatch level
        log.info("GGUF CPU kernels need AVX2; this CPU runs the dequantized layers")
        return None
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp for at::parallel_for's pragmas; not linked: the symbols resolve to torch's own OpenMP runtime
        # (a second one would spin its own threads against torch's on the same cores)
        name = f"qwen_serve_cpu_gguf_{arch}_{_cpu_id() if arch == 'native' else 'any'}"
        log.info("GGUF CPU kernels: loading %s (built at first use, ~20 s on 2 cores)", name)
        try:  # a private helper of torch's: without it, only the stale-lock check is skipped
            from torch.utils.cpp_extension import _get_build_directory

            remove_stale_lock(Path(_get_build_directory(name, verbose=False)))
        except (ImportError, OSError) as exc:
            log.info("no check for a stale build lock (%s)", exc)
        return load(name=name, sources=[str(Path(__file__).with_name("cpu_gguf.cpp"))],
                    extra_cflags=["-O3", f"-march={arch}", "-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja, or a CPU without the instructions: keep the torch path
        log.warning("GGUF CPU kernels could not be built (%s); serving dequantized GGUF layers instead", exc)
        return None


def available() -> bool:
    return build() is not None


def linear(x: torch.Tensor, shards: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] times a layer whose weight is `shards` (type name, uint8 blocks [rows, row bytes]) stacked along
    the outputs, plus bias -> [M, outputs] in x's dtype."""
    return build().linear(x, [blocks for _, blocks in shards], [TYPE_IDS[t] for t, _ in shards], bias)


def dequantize(shards: list[tuple[str, torch.Tensor]], in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [outputs, in_features] in `dtype`: exactly the gguf decoder's values, rounded once."""
    return build().dequantize([blocks for _, blocks in shards], [TYPE_IDS[t] for t, _ in shards], in_features, dtype)


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> the kernels' int8 codes (as float32) [M, K] and scales [M, K / 32]: d = max|x| / 127,
    q = round-half-to-even(x * (1 / d)) in float32."""
    blocks = x.float().reshape(x.shape[0], -1, ACTIVATION_BLOCK)
    d = blocks.abs().amax(-1) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(blocks * inverse[..., None]).reshape(x.shape), d


def linear_reference(x: torch.Tensor, shards: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` in torch, in float64: the activations rounded as the kernels round them, times the weights
    the gguf decoder of layers/quantization/gguf.py gives (which match the gguf package's own)."""
    from qwen_serve.layers.quantization.gguf import dequantize

    codes, d = quantize_reference(x)
    x_rounded = (codes.reshape(*d.shape, ACTIVATION_BLOCK) * d[..., None].double()).reshape(x.shape)
    k = x.shape[1]
    weight = torch.cat([dequantize(blocks, t, (blocks.shape[0], k)) for t, blocks in shards]).double()
    out = x_rounded @ weight.T
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)
