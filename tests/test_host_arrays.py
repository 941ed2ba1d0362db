"""Step inputs built on the host: block tables as one padded array."""

from __future__ import annotations

import random

import numpy as np

from qwen_serve.worker.host_arrays import block_table_array


def test_block_table_array_pads_each_row_with_block_zero():
    rng = random.Random(0)
    tables = [[rng.randrange(1, 5000) for _ in range(rng.randint(1, 40))] for _ in range(37)]
    width = max(map(len, tables)) + 3
    got = block_table_array(tables, width)
    want = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
    assert got.dtype == np.int32 and got.shape == (37, width)
    assert np.array_equal(got, want)
