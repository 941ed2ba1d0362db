"""Structured output: JSON mode, JSON Schema and Lark grammars enforced by token masks (llguidance).

Public API (CONTRACTS.md D):
    new_constraint(spec, tokenizer, vocab_size=None) -> TokenConstraint    one per sample
    precompile(spec, tokenizer, vocab_size=None) -> Future[CompiledGrammar]  compile off the loop; await it
    StructuredOutputError(ValueError)                                       400: names unsupported features
    TokenConstraint.fill_mask(bool[V]) / fill_bitmask(int32[B, W], row) / accept(id) / is_finished()
    allocate_bitmask, fill_bitmasks, apply_bitmask_                          batched masking for the runner
`vocab_size` should be the model's logits width (`model_config.vocab_size`); it defaults to the tokenizer's.

Why llguidance and not xgrammar (measured 2026-11-23 on the shared 2-core dev CPU, demo tokenizer, 151,936 ids,
`python -m qwen_serve.structured.bench grammar [--engine xgrammar]`; the table is in BENCHMARKS.md):
* Compile: llguidance builds each grammar tried in 0.8-15 ms (the first one of a process is the slow one);
  xgrammar takes 46-79 ms for ordinary schemas and 2.3-10.4 s for one with `maxItems: 30` (it expands
  bounded repetition ahead of time). A 2-10 s compile is a request stalled behind it; llguidance compiles lazily.
* Per-token mask: xgrammar 3-10 us mean, llguidance 17-64 us mean (p50 10-16 us); both far below one decode
  step (~150 ms on this CPU, ~10 ms on a GPU), so xgrammar's faster masks buy nothing measurable here.
* Unsupported keywords: llguidance refuses them and names them ("Unimplemented keys: [\"uniqueItems\"]"),
  which is the 400 the API promises, and it enforces `patternProperties`. xgrammar compiles all three
  without a word and then lets `[1, 1]` through `uniqueItems` and `[1, 2]` through `contains: {const: 5}`,
  and ignores `patternProperties` (with `additionalProperties: false` it allows only `{}`).
* Tool grammars: llguidance's Lark dialect embeds JSON schemas (`%json{...}`) and matches Qwen's
  `<tool_call>` special token, so one grammar expresses "one or more calls, each valid for its tool".
* Install: llguidance is one self-contained wheel; xgrammar requires torch, transformers, triton and
  apache-tvm-ffi (pip would add the triton GPU compiler to a CPU-only install).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from qwen_serve.structured.compiler import CompiledGrammar, GrammarCompiler
from qwen_serve.structured.constraint import (
    TokenConstraint,
    allocate_bitmask,
    apply_bitmask_,
    bitmask_words,
    fill_bitmasks,
)
from qwen_serve.structured.spec import StructuredOutputError, normalize_spec

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "StructuredOutputError",
    "TokenConstraint",
    "allocate_bitmask",
    "apply_bitmask_",
    "bitmask_words",
    "default_compiler",
    "fill_bitmasks",
    "new_constraint",
    "normalize_spec",
    "precompile",
]

_default: GrammarCompiler | None = None
_default_lock = threading.Lock()


def default_compiler() -> GrammarCompiler:
    """The process-wide compiler and cache shared by the server (precompile) and the engine (new_constraint)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = GrammarCompiler()
        return _default


def precompile(spec: Any, tokenizer: Any, vocab_size: int | None = None) -> Future[CompiledGrammar]:
    return default_compiler().precompile(spec, tokenizer, vocab_size)


def new_constraint(spec: Any, tokenizer: Any, vocab_size: int | None = None) -> TokenConstraint:
    return default_compiler().new_constraint(spec, tokenizer, vocab_size)
