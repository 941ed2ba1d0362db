"""The CPU kernels, C++ beside this file built into one module by torch's extension builder: cpu_gguf.cpp
(GGUF linears from the file's blocks, kernels/cpu_gguf.py), cpu_attention.cpp (a decode step's
attention, kernels/cpu_attention.py) and cpu_norm.cpp (RMSNorm, kernels/cpu_norm.py).

Compiled once per machine, while the first model loads (worker/model_runner.py), for the CPU it runs on
(`-march=native`; ~40 s on 2 cores, cached under TORCH_EXTENSIONS_DIR). Where it cannot be built (no
compiler, no AVX2) `available()` is False and the layers keep their torch paths.
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

SOURCES = ("cpu_gguf.cpp", "cpu_attention.cpp", "cpu_norm.cpp", "cpu_bindings.cpp")


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
    log.warning("removed %s, left by a build of the CPU kernels that did not finish", lock)
    return True


@functools.lru_cache(maxsize=None)
def build(arch: str = "native"):
    """The kernels compiled for `arch` (gcc's -march: "native" serves; the tests also build "haswell", AVX2
    without AVX-512 or VNNI, so that the fallback paths run on any machine), or None with the reason logged
    where they cannot be built here."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):  # "AVX2" / "AVX512": torch's own dispatch level
        log.info("the CPU kernels need AVX2; this CPU runs the torch paths")
        return None
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp for at::parallel_for's pragmas; not linked: the symbols resolve to torch's own OpenMP runtime
        # (a second one would spin its own threads against torch's on the same cores)
        name = f"qwen_serve_cpu_{arch}_{_cpu_id() if arch == 'native' else 'any'}"
        log.info("CPU kernels: loading %s (built at first use, ~40 s on 2 cores)", name)
        try:  # a private helper of torch's: without it, only the stale-lock check is skipped
            from torch.utils.cpp_extension import _get_build_directory

            remove_stale_lock(Path(_get_build_directory(name, verbose=False)))
        except (ImportError, OSError) as exc:
            log.info("no check for a stale build lock (%s)", exc)
        return load(name=name, sources=[str(Path(__file__).with_name(s)) for s in SOURCES],
                    extra_cflags=["-O3", f"-march={arch}", "-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja, or a CPU without the instructions
        log.warning("the CPU kernels could not be built (%s); the layers keep their torch paths", exc)
        return None


def available() -> bool:
    return build() is not None
