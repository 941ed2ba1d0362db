"""Host lists -> tensors, the way a step's inputs are built every step.

`torch.tensor` walks a Python list at ~75 ns an element; numpy's converter takes about a third of
that (a 256 x 64 block table: 1.2 ms vs 0.4 ms on a slow core), which matters for a decode step of
hundreds of sequences whose GPU work is ~10 ms.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def host_tensor(values: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A (possibly nested, rectangular) list, or an array -> a CPU tensor of `dtype`."""
    return torch.from_numpy(np.asarray(values, dtype=_NUMPY[dtype]))


def block_table_array(tables: list[list[int]], width: int) -> np.ndarray:
    """Block tables of different lengths -> int32 [len(tables), width], each row padded with block 0 (a
    valid id: the attention reads no entry past a sequence's length). Built from one flat pass over the
    ids rather than a padded copy of every list: 0.26 against 0.61 ms for 256 tables of 7-64 blocks."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
    out = np.zeros((len(tables), width), dtype=np.int32)
    out[np.arange(width) < lens[:, None]] = flat  # row-major order: each row's ids, then the next row's
    return out
