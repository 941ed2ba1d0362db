"""Stop strings over streamed text: finds them across token boundaries and never emits them.

Text that could be the start of a stop string is held back until the next tokens show it is not
(or the sequence ends for another reason, when it is flushed). Token-level stops (eos,
`stop_token_ids`, lengths) are decided by the engine; this module only sees text.
"""

from __future__ import annotations


class StopStringChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include = include_stop_str_in_output
        self.max_len = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all text decoded so far (possibly past a stop string)
        self.emitted = 0  # length of text[...] already handed out
        self.stop_reason: str | None = None
        self.final_len: int | None = None  # set once a stop string was found

    def add(self, new_text: str, check: bool = True) -> str:
        """Appends decoded text; returns what may be emitted now (empty once stopped).

        `check=False` (before min_tokens are generated) appends without looking for stop strings.
        """
        if self.final_len is not None:
            return ""
        old_len = len(self.text)
        self.text += new_text
        if not check:
            return self._emit(len(self.text))
        if self.stop:
            # A stop string ending in the new text starts at most max_len - 1 characters earlier.
            window_start = max(0, old_len - self.max_len + 1)
            best: tuple[int, str] | None = None
            for s in self.stop:
                pos = self.text.find(s, window_start)
                if pos >= 0 and (best is None or pos < best[0]):
                    best = (pos, s)
            if best is not None:
                pos, s = best
                self.stop_reason = s
                self.final_len = pos + len(s) if self.include else pos
                return self._emit(self.final_len)
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Everything not yet emitted (the sequence ended for another reason)."""
        end = self.final_len if self.final_len is not None else len(self.text)
        return self._emit(end)

    @property
    def output_text(self) -> str:
        return self.text[: self.final_len] if self.final_len is not None else self.text

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self.text
        for k in range(min(self.max_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
