"""The paged KV cache's bookkeeping, pure Python: which block holds which tokens of which sequence.

Blocks hold `block_size` tokens. A free pool (an ordered dict used as an LRU queue) holds every
block with no reference; a block that is full keeps its content hash after it is freed, so a later
prompt with the same prefix can take it back (prefix caching) until the block is reused for
something else (eviction, oldest first). Hashes are chained - a block's hash covers all tokens
before it - so equal hashes mean equal prefixes (Python's 64-bit tuple hash; a collision would
share a wrong block, the same trade-off vLLM makes with its default hash).

Reference counts let the n samples of one request share their prompt blocks; a sample about to
write into a block it shares gets a private copy first (copy-on-write: the copy is done on the
device by the runner, before the step's forward pass).
"""

from __future__ import annotations

from collections import OrderedDict

from qwen_serve.engine.request import Sequence


class KVBlock:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block is full and registered in the prefix cache

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, hash={self.hash})"


def block_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Unreferenced blocks; the front is taken first. Blocks without content go to the front,
        # cached ones to the back, so cached prefixes are evicted last and least recently used first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new allocations (free or cached but unreferenced)."""
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`'s tokens (no references taken).

        At most (num_tokens - 1) // block_size blocks, so at least one token is left to compute:
        the step needs its hidden state to sample the next token.
        """
        if not self.enable_prefix_caching:
            return []
        bs, tokens = self.block_size, seq.token_ids
        hits: list[int] = []
        parent = None
        for i in range((len(tokens) - 1) // bs):
            parent = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counts one admitted sequence's prefix-cache lookup (for the hit-rate metrics)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ---------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> list[tuple[int, int]] | None:
        """Makes room for `num_new_tokens` more tokens of `seq` past its computed ones.

        `cached_blocks` (from `find_cached_blocks`, only for a sequence holding no blocks) become
        the start of its block table and count as computed. Returns the (src, dst) block copies
        that copy-on-write needs, or None (and changes nothing) when there are not enough blocks.
        """
        if not cached_blocks:
            return self._extend(seq, seq.num_computed_tokens + num_new_tokens)
        if seq.block_ids:
            raise RuntimeError("cached blocks can only start an empty block table")
        bs = self.block_size
        computed = len(cached_blocks) * bs
        end = computed + num_new_tokens
        held = len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)  # leave the free pool
        # The check _extend makes below, counted before the cached blocks leave the free pool: once
        # this passes, that one does too, so nothing is taken for a call that fails.
        if max(0, self.blocks_needed(end) - held) > len(self.free) - revived:
            return None
        for b in cached_blocks:
            self._take(b)
        seq.block_ids.extend(cached_blocks)
        seq.num_computed_tokens = computed
        seq.block_hashes = [self.blocks[b].hash for b in cached_blocks]
        return self._extend(seq, end)

    def _extend(self, seq: Sequence, end: int) -> list[tuple[int, int]] | None:
        """Makes `seq`'s blocks cover `end` tokens, past its computed ones (which its blocks hold).
        Called once a step for every running sequence, so the usual case - the write lands in the
        sequence's own last block, or needs one new block - does no more than it must."""
        bs = self.block_size
        table = seq.block_ids
        held = len(table)
        needed = self.blocks_needed(end)
        # Shared blocks this write would land in (only ever the partial block of forked samples).
        shared = [i for i in range(seq.num_computed_tokens // bs, min(held, needed))
                  if self.blocks[table[i]].ref_count > 1]
        if max(0, needed - held) + len(shared) > len(self.free):
            return None
        copies = []
        for i in shared:
            src = table[i]
            dst = self._pop_free()
            self.blocks[src].ref_count -= 1
            table[i] = dst
            copies.append((src, dst))
        for _ in range(needed - held):
            table.append(self._pop_free())
        # A token still on the device (overlapped steps) is hashed on a later call, once it is known.
        known = min(end, len(seq.token_ids))
        if self.enable_prefix_caching and known // bs > len(seq.block_hashes):
            self._cache_full_blocks(seq, known)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (copy-on-write later)."""
        for b in parent.block_ids:
            self.blocks[b].ref_count += 1
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)

    def free_sequence(self, seq: Sequence) -> None:
        """Drops `seq`'s references. Tail blocks are freed first, so they are also evicted first."""
        for b in reversed(seq.block_ids):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
                if block.hash is None:
                    self.free.move_to_end(b, last=False)
        seq.block_ids = []
        seq.block_hashes = []

    # ---- internals ----------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its content is about to be overwritten
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Registers the blocks that `num_tokens` tokens fill (their tokens are all known)."""
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(parent)
            block = self.blocks[seq.block_ids[i]]
            if block.hash is None and parent not in self.cached:
                block.hash = parent
                self.cached[parent] = block.block_id
