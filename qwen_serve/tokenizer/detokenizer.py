"""Incremental detokenization for streaming: token ids in, newly completed text out.

Byte-level BPE splits one character over several tokens (most Chinese characters, every emoji), so
decoding a token on its own can end in U+FFFD. The detokenizer decodes a short window of recent
tokens twice - without and with the new ones - and emits the difference only once it no longer
ends in U+FFFD; the held bytes come out with the token that completes them. Cost per call is
bounded by the window, not by the length of the text (the window restarts after each emission).
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-sequence streaming state; `.add(ids)` returns the text those ids completed."""

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] decode to text already emitted: the context that makes
        # the next tokens decode the same way as in a full decode.
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        window = self._ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full_text = self._tokenizer.decode(window, self._skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or the last character is still incomplete: hold it back
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (invalid bytes decode as U+FFFD)."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset :], self._skip)
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta
