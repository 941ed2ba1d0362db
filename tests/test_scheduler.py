"""Scheduler without a model: token budget, chunked prefill, preemption, forks and aborts, exact block ids."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from qwen_serve.engine.block_manager import BlockManager
from qwen_serve.engine.request import Request
from qwen_serve.engine.scheduler import Scheduler


def _request(rid: str, n_tokens: int, n: int = 1, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n_tokens)), SimpleNamespace(n=n), 0.0)


def _make(num_blocks=16, block_size=4, max_seqs=8, budget=64, caching=True):
    return Scheduler(BlockManager(num_blocks, block_size, caching), max_seqs, budget)


def _step(s: Scheduler, token: int = 999):
    """One schedule plus what the engine does after the forward pass: append a sampled token."""
    out = s.schedule()
    for chunk in out.chunks:
        for seq in chunk.sample_seqs:
            seq.token_ids.append(token)
    return out


def test_scheduler_imports_no_torch():
    import subprocess

    code = "import sys, qwen_serve.engine.scheduler, qwen_serve.engine.block_manager; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_budget_mixes_decodes_and_prefill_chunks():
    s = _make(budget=10)
    a, b = _request("a", 6), _request("b", 9, base=100)
    s.add_request(a)
    s.add_request(b)
    out = _step(s)
    assert [(c.seq.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 6), ("b", 0, 4)]
    assert [len(c.sample_seqs) for c in out.chunks] == [1, 0]  # b's chunk does not reach its end
    assert a.sequences[0].block_ids == [0, 1] and b.sequences[0].block_ids == [2]
    out = _step(s)
    # a decodes one token, b gets the rest of its prompt; one step holds both.
    assert [(c.seq.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 6, 1), ("b", 4, 5)]
    assert [len(c.sample_seqs) for c in out.chunks] == [1, 1]
    assert b.sequences[0].block_ids == [2, 3, 4]


def test_max_num_seqs_limits_running():
    s = _make(max_seqs=2)
    for i in range(3):
        s.add_request(_request(str(i), 3, base=10 * i))
    out = _step(s)
    assert len(out.chunks) == 2 and len(s.waiting) == 1


def test_preemption_frees_newest_and_resumes():
    s = _make(num_blocks=4, block_size=4, budget=64)
    a, b = _request("a", 7), _request("b", 7, base=100)
    s.add_request(a)
    s.add_request(b)
    _step(s)
    assert a.sequences[0].block_ids == [0, 1] and b.sequences[0].block_ids == [2, 3]
    _step(s)  # position 7 still fits in each second block
    out = _step(s)  # position 8 needs a new block each: b (newest) is preempted for a
    sa, sb = a.sequences[0], b.sequences[0]
    assert out.preempted == [sb] and s.num_preemptions == 1
    assert [c.seq for c in out.chunks] == [sa]
    assert sa.block_ids == [0, 1, 3] and sb.block_ids == [] and sb.num_computed_tokens == 0
    assert list(s.waiting) == [sb]
    s.finish_sequence(sa)
    out = _step(s)
    # b comes back: its first full block is still cached (block 2), the rest is recomputed.
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(sb, 4, 5)]
    assert sb.block_ids[0] == 2
    # Lookups counted once per admission: a (7), b (7), b again (9 tokens, 4 of them cached).
    assert (s.bm.prefix_cache_queries, s.bm.prefix_cache_hits) == (23, 4)
    s.finish_sequence(sb)
    assert s.bm.num_free_blocks == 4 and all(blk.ref_count == 0 for blk in s.bm.blocks)


def test_fork_shares_prompt_blocks_then_copies_on_write():
    s = _make(num_blocks=8, block_size=4)
    r = _request("r", 6, n=3)
    s.add_request(r)
    out = _step(s)
    assert len(out.chunks) == 1 and len(out.chunks[0].sample_seqs) == 3
    assert [seq.block_ids for seq in r.sequences] == [[0, 1]] * 3
    assert s.bm.blocks[1].ref_count == 3
    out = _step(s)
    assert out.block_copies == [(1, 2), (1, 3)]
    assert [seq.block_ids for seq in r.sequences] == [[0, 2], [0, 3], [0, 1]]
    s.finish_request(r)
    assert s.bm.num_free_blocks == 8


def test_abort_mid_prefill_returns_blocks_and_tells_runner():
    s = _make(budget=4)
    r = _request("r", 12)
    s.add_request(r)
    _step(s)
    assert r.sequences[0].num_computed_tokens == 4
    s.finish_request(r)
    assert s.bm.num_free_blocks == 16 and not s.running
    out = s.schedule()
    assert out.finished_seq_ids == [r.sequences[0].seq_id] and out.is_empty
