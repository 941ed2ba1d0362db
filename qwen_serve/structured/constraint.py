"""One request's grammar state (`TokenConstraint`) and the batched token masks the sampler applies.

Two ways for the engine to mask logits, both exact:

* Per request, simple: `constraint.fill_mask(allowed)` writes a bool row over the logits width
  (True = allowed), then `logits[row].masked_fill_(~allowed, -inf)`. ~60 us per row on the CPU.
* Per batch, cheap on a GPU (what the runner should do):
      bitmask = allocate_bitmask(max_num_seqs, vocab_size)     # once: int32 [B, ceil(V/32)], pinned
      bitmask[:n].fill_(-1)                                      # every row "all allowed"
      fill_bitmasks([(c, row) for constrained rows], bitmask)    # llguidance threads, GIL released
      apply_bitmask_(logits[:n], bitmask[:n])                    # one H2D copy + one masked_fill_
  `fill_bitmasks` releases the GIL, so the runner can start it on a worker thread right after it launches
  the forward pass and join it before sampling: the masks are ready when the logits are.

Bit j of word w allows token 32*w + j (little-endian, llguidance's layout). A constraint's vocabulary is the
logits width it was built for (`new_constraint(..., vocab_size=model vocab)`), which can exceed the
tokenizer's: ids past the tokenizer are never allowed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher
from llguidance.torch import fill_next_token_bitmask_par

from qwen_serve.layers.sampler import apply_bitmask_  # re-exported: the worker applies masks without llguidance


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """int32 [batch_size, ceil(vocab_size / 32)], all bits set (= nothing masked); pinned when CUDA is present."""
    return torch.full((batch_size, bitmask_words(vocab_size)), -1, dtype=torch.int32,
                      pin_memory=torch.cuda.is_available())


class TokenConstraint:
    """Grammar state of one sample: which token ids may come next, and advancing on the sampled one.

    Not thread-safe: one sample's constraint is used by one thread at a time (the engine loop, or the
    mask-filling worker while the loop waits for the forward pass).
    """

    __slots__ = ("_matcher", "vocab_size", "_words")

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._words = torch.empty(bitmask_words(vocab_size), dtype=torch.int32)  # scratch for fill_mask

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed ids of the next token into `bitmask[row]` (int32, CPU, [B, ceil(vocab_size/32)])."""
        _check_bitmask(bitmask, self.vocab_size)
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def fill_mask(self, allowed: torch.Tensor) -> None:
        """Set `allowed` (bool [V], V >= vocab_size, any device) to True exactly for the ids allowed next."""
        if allowed.dtype != torch.bool or allowed.dim() != 1 or allowed.shape[0] < self.vocab_size:
            raise ValueError(f"allowed must be a bool vector of at least {self.vocab_size} entries, "
                             f"got {allowed.dtype} {tuple(allowed.shape)}")
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        # One pass over 19K words: the int32 words seen as bytes, unpacked LSB-first -> one uint8 per token.
        bits = np.unpackbits(self._words.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        if allowed.device.type == "cpu":
            # numpy's copy is a memcpy (~3 us); torch's CPU copy_ of 150 KB measured ~200 us here.
            row = allowed.numpy()
            np.copyto(row[: self.vocab_size], bits.view(np.bool_))
            row[self.vocab_size:] = False
        else:
            allowed[: self.vocab_size].copy_(torch.from_numpy(bits.view(np.bool_)), non_blocking=False)
            allowed[self.vocab_size:] = False

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids`, in order, the grammar allows next (its state unchanged): speculative drafts
        past that are not proposed."""
        return self._matcher.validate_tokens(token_ids)

    def fill_draft_bitmasks(self, drafts: list[int], bitmask: torch.Tensor, first_row: int) -> None:
        """`bitmask[first_row + j]`: the ids allowed after the first j drafts, j = 0..len(drafts), for the rows
        that verify them (drafts the grammar allows: `valid_prefix`). The state is the same after as before."""
        for j, token in enumerate(drafts):
            self.fill_bitmask(bitmask, first_row + j)
            if not self._matcher.consume_token(token):
                raise ValueError(f"draft token {token} is not allowed by the grammar")
        self.fill_bitmask(bitmask, first_row + len(drafts))
        self._matcher.rollback(len(drafts))

    def accept(self, token_id: int) -> bool:
        """Advance past the sampled token. False if the grammar forbids it (the constraint then stays in error)."""
        return self._matcher.consume_token(token_id)

    def is_finished(self) -> bool:
        """The grammar is complete: nothing but an end-of-sequence token may follow (the engine may stop now)."""
        return self._matcher.is_stopped()

    def is_error(self) -> bool:
        return self._matcher.is_error()

    @property
    def error(self) -> str:
        """Why the constraint is in error (empty when it is not); in error only end-of-sequence is allowed."""
        return self._matcher.get_error()


_executor: LLExecutor | None = None


def fill_bitmasks(rows: Sequence[tuple[TokenConstraint, int]], bitmask: torch.Tensor) -> None:
    """Fill `bitmask[row]` for each (constraint, row) in parallel on llguidance's threads, GIL released.

    Rows not listed are left as they are (the caller sets unconstrained rows to -1).
    """
    global _executor
    if not rows:
        return
    vocab_size = rows[0][0].vocab_size
    for constraint, _ in rows:
        if constraint.vocab_size != vocab_size:
            raise ValueError("all constraints in one batch must share a vocabulary size")
    _check_bitmask(bitmask, vocab_size)
    if _executor is None:  # one pool per process, sized by llguidance (80% of the cores)
        _executor = LLExecutor()
    fill_next_token_bitmask_par(_executor, [(c._matcher, row) for c, row in rows], bitmask)


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    # llguidance writes through a raw pointer: the row width must be exact and the memory CPU-contiguous.
    if (bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu"
            or not bitmask.is_contiguous() or bitmask.shape[1] != bitmask_words(vocab_size)):
        raise ValueError(f"bitmask must be a contiguous CPU int32 tensor [B, {bitmask_words(vocab_size)}], "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}")
