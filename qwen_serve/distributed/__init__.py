"""Tensor parallelism: the process group of a model's shards and the collectives its layers call."""

from qwen_serve.distributed.parallel import ParallelContext, divide, kv_head_range

__all__ = ["ParallelContext", "divide", "kv_head_range"]
