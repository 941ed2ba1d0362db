"""One rank's place in a tensor-parallel group, and the two collectives the layers need.

Layers are built with a `ParallelContext` (through `LayerOptions`), never from process-wide state:
a model built with the default context (size 1) is the whole model and its collectives do nothing,
so the single-GPU path runs exactly the code it ran before tensor parallelism existed. Collectives go
through torch.distributed: NCCL between GPUs (which CUDA graphs capture), gloo between CPU processes.
(The split follows Megatron-LM as vLLM and gpt-fast's `tp.py` apply it: q/k/v and gate/up by output
columns, o_proj and down_proj by input rows with an all-reduce, the vocabulary by rows.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, eq=False)
class ParallelContext:
    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed process group of the size ranks; None when size is 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side along the last dimension: [..., size * n]."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def divide(total: int, size: int, what: str) -> int:
    if total % size:
        raise ValueError(f"--tensor-parallel-size {size} does not divide {what} ({total})")
    return total // size


def kv_head_range(num_kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """(first key/value head, count) that `rank` holds. With more ranks than heads each head is
    replicated on size / num_kv_heads consecutive ranks (Qwen2.5-7B has 4 kv heads)."""
    if size <= num_kv_heads:
        per_rank = divide(num_kv_heads, size, "the key/value heads")
        return rank * per_rank, per_rank
    replicas = size // num_kv_heads
    if size % num_kv_heads:
        raise ValueError(f"--tensor-parallel-size {size} is larger than the {num_kv_heads} key/value heads "
                         "and not a multiple of them")
    return rank // replicas, 1


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Refuses, before any weight is read, a size the model's shapes cannot be split by."""
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {size}")
    divide(num_heads, size, "the attention heads")
    kv_head_range(num_kv_heads, size, 0)
    divide(intermediate_size, size, "the MLP's intermediate size")
