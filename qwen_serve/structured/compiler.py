"""Grammar compilation off the engine loop, with a bounded LRU cache of compiled grammars.

`GrammarCompiler.precompile(spec, tokenizer, vocab_size)` returns a `concurrent.futures.Future` of a
`CompiledGrammar`, computed on a small thread pool (llguidance releases the GIL while it builds a grammar,
so compiling never stalls the engine loop or the event loop). The server awaits it before admitting a request
(`asyncio.wrap_future`), which turns a bad schema into a 400 and leaves the engine a cache hit; the engine's
`new_constraint` then only copies the compiled matcher (~2 us).

Cache key: the tokenizer, the logits width and the spec's canonical JSON. Entries are futures, so
concurrent requests with the same new schema compile it once; failures are cached too (a schema that
cannot compile never will).

The llguidance tokenizer (token bytes + the token trie, ~1 s to build at 151,936 tokens) is built once per
(tokenizer, vocab_size), also on the pool.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer as BackendTokenizer

from qwen_serve.structured.constraint import TokenConstraint
from qwen_serve.structured.spec import StructuredOutputError, grammar_for_spec, normalize_spec, spec_key


class CompiledGrammar:
    """A checked grammar bound to one tokenizer: a pristine matcher that constraints are copied from."""

    __slots__ = ("_matcher", "vocab_size", "key")

    def __init__(self, matcher: LLMatcher, vocab_size: int, key: str) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.key = key

    def new_constraint(self) -> TokenConstraint:
        return TokenConstraint(self._matcher.deep_copy(), self.vocab_size)


def build_ll_tokenizer(tokenizer: Any, vocab_size: int) -> LLTokenizer:
    """llguidance's view of qwen_serve's Tokenizer (its `backend` tokenizers.Tokenizer and `eos_token_ids`).

    n_vocab is the logits width: the model's vocab (151,936 for Qwen2.5 0.5B, 152,064 for 7B) is often larger
    than the tokenizer's (151,665 in the HF release); ids without a token are never allowed.
    """
    eos = list(tokenizer.eos_token_ids)
    if not eos:
        raise StructuredOutputError("structured output needs a tokenizer with an end-of-sequence token")
    # A private copy without padding/truncation: those would change how llguidance re-tokenizes text.
    backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    return LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)


class GrammarCompiler:
    """Compiles specs into `CompiledGrammar`s on a thread pool; keeps the last `max_entries` of them."""

    def __init__(self, max_entries: int = 256, max_workers: int = 2) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._grammars: OrderedDict[tuple[int, int, str], Future[CompiledGrammar]] = OrderedDict()
        # id(tokenizer) -> (tokenizer kept alive so the id is not reused, {vocab_size: future LLTokenizer})
        self._tokenizers: dict[int, tuple[Any, dict[int, Future[LLTokenizer]]]] = {}

    def precompile(self, spec: Any, tokenizer: Any, vocab_size: int | None = None) -> Future[CompiledGrammar]:
        """Future of the compiled spec; malformed specs raise StructuredOutputError here, bad grammars in the future."""
        normalized = normalize_spec(spec)
        vocab = _vocab_size(tokenizer, vocab_size)
        key = (id(tokenizer), vocab, spec_key(normalized))
        with self._lock:
            future = self._grammars.get(key)
            if future is not None:
                self._grammars.move_to_end(key)
                return future
            ll_tokenizer = self._ll_tokenizer(tokenizer, vocab)
            future = self._pool.submit(_compile, normalized, key[2], ll_tokenizer, vocab)
            self._grammars[key] = future
            while len(self._grammars) > self.max_entries:
                self._grammars.popitem(last=False)
            return future

    def new_constraint(self, spec: Any, tokenizer: Any, vocab_size: int | None = None) -> TokenConstraint:
        """A fresh constraint for one sample; waits for the compile if it is still running."""
        return self.precompile(spec, tokenizer, vocab_size).result().new_constraint()

    def cache_size(self) -> int:
        with self._lock:
            return len(self._grammars)

    def _ll_tokenizer(self, tokenizer: Any, vocab: int) -> Future[LLTokenizer]:
        # Called with self._lock held.
        _, by_vocab = self._tokenizers.setdefault(id(tokenizer), (tokenizer, {}))
        future = by_vocab.get(vocab)
        if future is None:
            future = by_vocab[vocab] = self._pool.submit(build_ll_tokenizer, tokenizer, vocab)
        return future


def _vocab_size(tokenizer: Any, vocab_size: int | None) -> int:
    tokenizer_vocab = int(tokenizer.vocab_size)
    if vocab_size is None:
        return tokenizer_vocab
    if vocab_size < tokenizer_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids")
    return vocab_size


def _compile(spec: dict[str, Any], key: str, ll_tokenizer: Future[LLTokenizer], vocab: int) -> CompiledGrammar:
    # Runs on the pool. log_level=0: errors are read back from the matcher, not printed to stderr.
    try:
        grammar = grammar_for_spec(spec)
    except ValueError as e:
        raise StructuredOutputError(f"invalid {spec['type']} spec: {e}") from None
    matcher = LLMatcher(ll_tokenizer.result(), grammar, log_level=0)
    # The first mask builds the lexer's initial state: do it here, not on the engine loop.
    if not matcher.is_error():
        matcher.compute_bitmask()
    if matcher.is_error():
        what = "JSON schema" if spec["type"] in ("json_schema", "json_object") else "grammar"
        raise StructuredOutputError(f"unsupported {what}: {matcher.get_error()}")
    return CompiledGrammar(matcher, vocab, key)
