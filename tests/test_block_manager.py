"""Block manager: exact block ids for allocation, prefix-cache hits, LRU eviction, copy-on-write."""

from __future__ import annotations

from types import SimpleNamespace

from qwen_serve.engine.block_manager import BlockManager
from qwen_serve.engine.request import Request


def _seq(tokens: list[int], n: int = 1):
    return Request("r", tokens, SimpleNamespace(n=n), 0.0).sequences[0]


def _run(bm: BlockManager, seq, num_tokens: int | None = None):
    """Allocates and marks computed, as the scheduler does."""
    num_tokens = seq.num_tokens - seq.num_computed_tokens if num_tokens is None else num_tokens
    copies = bm.allocate_slots(seq, num_tokens)
    assert copies is not None
    seq.num_computed_tokens += num_tokens
    return copies


def test_allocation_and_free_order():
    bm = BlockManager(8, 4)
    a = _seq(list(range(10)))
    _run(bm, a)
    assert a.block_ids == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert set(bm.cached.values()) == {0, 1}  # the two full blocks; block 2 holds 2 tokens
    bm.free_sequence(a)
    # Block 2 (no content worth keeping) goes to the front; cached ones to the back, tail first.
    assert list(bm.free) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_reuses_exact_blocks_and_counts():
    bm = BlockManager(8, 4)
    a = _seq(list(range(10)))
    _run(bm, a)
    bm.free_sequence(a)
    b = _seq(list(range(8)) + [50, 51, 52])
    hits = bm.find_cached_blocks(b)
    assert hits == [0, 1]
    assert bm.allocate_slots(b, 3, hits) == []
    assert b.block_ids == [0, 1, 2] and b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [1, 1, 1]


def test_hit_leaves_last_token_to_compute():
    bm = BlockManager(8, 4)
    a = _seq(list(range(8)))
    _run(bm, a)
    bm.free_sequence(a)
    again = _seq(list(range(8)))
    assert bm.find_cached_blocks(again) == [0]  # the last block is recomputed to get its logits


def test_lru_eviction_order():
    bm = BlockManager(8, 4)
    a = _seq(list(range(10)))
    _run(bm, a)
    bm.free_sequence(a)  # free queue: [2, 3, 4, 5, 6, 7, 1, 0]
    c = _seq(list(range(100, 128)))  # 7 blocks: takes 2..7 then evicts cached block 1
    _run(bm, c)
    assert c.block_ids == [2, 3, 4, 5, 6, 7, 1]
    assert bm.blocks[1].hash == c.block_hashes[6] and bm.blocks[0].hash is not None
    probe = _seq(list(range(10)))
    assert bm.find_cached_blocks(probe) == [0]


def test_shared_hit_between_running_sequences_counts_refs():
    bm = BlockManager(8, 4)
    a = _seq(list(range(9)))
    _run(bm, a)
    b = _seq(list(range(9)))
    hits = bm.find_cached_blocks(b)
    assert hits == [0, 1]
    bm.allocate_slots(b, 1, hits)
    assert b.block_ids == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    bm.free_sequence(a)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 8


def test_not_enough_blocks_changes_nothing():
    bm = BlockManager(2, 4)
    a = _seq(list(range(12)))
    assert bm.allocate_slots(a, 12) is None
    assert a.block_ids == [] and bm.num_free_blocks == 2


def test_fork_and_copy_on_write():
    bm = BlockManager(8, 4)
    parent = _seq(list(range(6)), n=3)
    _run(bm, parent)
    assert parent.block_ids == [0, 1]
    children = [parent.fork(k) for k in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    assert [bm.blocks[i].ref_count for i in (0, 1)] == [3, 3]
    for s, token in zip([parent, *children], (7, 8, 9)):
        s.token_ids.append(token)
    # Position 6 lies in shared block 1: the first two writers copy it, the last writes in place.
    assert _run(bm, parent) == [(1, 2)]
    assert _run(bm, children[0]) == [(1, 3)]
    assert _run(bm, children[1]) == []
    assert parent.block_ids == [0, 2] and children[0].block_ids == [0, 3] and children[1].block_ids == [0, 1]
    assert bm.blocks[0].ref_count == 3
    for s in (parent, *children):
        bm.free_sequence(s)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_caching_off_caches_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = _seq(list(range(10)))
    _run(bm, a)
    bm.free_sequence(a)
    assert bm.cached == {} and bm.find_cached_blocks(_seq(list(range(10)))) == []
    assert list(bm.free) == list(range(8))
