"""The fake steps a GPU runner runs once at start-up, before it serves (pure Python: no torch here).

Prefill and mixed steps run eagerly, and Triton compiles a kernel variant the first time a step needs
one: ~1.3 s each on the H200's host, which a server's first requests of each kind would otherwise wait
for (the first 32K prompt took 2,286 ms against 1,026 for the next ones on the H100 before this; 1,042
against 1,010 on the H200 after, BENCHMARKS.md runs 13 and 15). Which variant an eager step needs
depends only on a few of its traits, so one step of each kind covers every step a scheduler can make:
- a long chunk after a cached prefix: the long-chunk path (FA3's call, or cuDNN's two calls and their merge);
- the most sampling rows a step can hold: the last layer attends for those rows as a decode-shaped
  batch, whose key tiles widen once the batch covers every multiprocessor;
- one sampling row after a short chunk: the same decode-shaped batch at its narrowest, and the
  paged-attention kernel's prefill variant;
- a chunk of each power of two tokens up to `linear_rows_max`: the quantized linears' tensor-core kernels
  pick their tiles by the rows' power of two up to there (kernels/int4pack.py `mm_config`,
  kernels/quant_linear.py `mm_config`), so a mixed step of 37 tokens needs the 64-row variant (run 61: eight
  of them compiled inside the 256-request throughput run, 3.5 of its 16.9 s); and a chunk of one token
  more, where the budget allows one, for their dequantize path beyond (run 65: compiled by the first
  such step otherwise).
Decode-only steps replay CUDA graphs, whose capture compiles their own variants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WarmUpStep:
    """Sequence i computes query_lens[i] tokens after context_lens[i] cached ones; each sequence's last
    row samples."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def eager_warm_up_steps(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                        dense_min_len: int | None, linear_rows_max: int = 0) -> list[WarmUpStep]:
    """The steps (see the module docstring) that fit the engine's limits: at most max_num_seqs sequences
    and max_num_batched_tokens tokens a step, contexts within max_model_len. Every chunk follows a cached
    prefix of one block, as later chunks of a prompt do."""
    ctx = block_size
    steps: list[WarmUpStep] = []
    if dense_min_len is not None and dense_min_len <= max_num_batched_tokens and ctx + dense_min_len <= max_model_len:
        steps.append(WarmUpStep((dense_min_len,), (ctx,)))
    if ctx + 2 > max_model_len or max_num_batched_tokens < 2:
        return steps
    # A chunk of 2 tokens keeps the step from being decode-only (graphs serve those).
    rows = min(max_num_seqs, max_num_batched_tokens - 1)
    if rows > 1:
        steps.append(WarmUpStep((2,) + (1,) * (rows - 1), (ctx,) * rows))
    steps.append(WarmUpStep((2,), (ctx,)))
    n = 4
    while n <= min(linear_rows_max, max_num_batched_tokens) and ctx + n <= max_model_len:
        steps.append(WarmUpStep((n,), (ctx,)))
        n *= 2
    # and one past the bound (their dequantize path), unless the dense chunk above is one
    past = linear_rows_max + 1
    if (linear_rows_max and past <= max_num_batched_tokens and ctx + past <= max_model_len
            and not any(max(s.query_lens) >= past for s in steps)):
        steps.append(WarmUpStep((past,), (ctx,)))
    return steps
