"""Reasoning models' thinking, split from their answer: `--reasoning-parser` (vLLM's flag and names).

DeepSeek-R1-Distill-Qwen, QwQ and Qwen3 think inside <think>...</think> before they answer. The chat API
returns the thinking as `reasoning_content` (on messages and streamed deltas) and the answer as `content`;
tool calls and JSON output apply to the answer only (the engine's grammar starts after </think>:
SamplingParams.reasoning_end_token_id).

Where the thinking starts is read from the prompt: a template that ends the prompt with <think> (R1, QwQ)
or </think> (Qwen3 with thinking off) says it. A prompt with neither leaves it to the output: <think> at its
start opens thinking; without one, deepseek_r1 and qwq take the output as thinking until </think> (R1 may
omit the tag, as vLLM's parser assumes) and qwen3 takes it as the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

START, END = "<think>", "</think>"
# parser name -> whether output that opens with no tag, after a prompt with none, is thinking
PARSERS = {"deepseek_r1": True, "qwq": True, "qwen3": False}


def check_parser_name(name: str | None) -> None:
    if name is not None and name not in PARSERS:
        raise ValueError(f"--reasoning-parser {name!r} is not supported; supported: {tuple(PARSERS)}")


@dataclass(frozen=True, slots=True)
class ReasoningTags:
    name: str
    start_id: int
    end_id: int
    untagged_is_reasoning: bool

    @classmethod
    def of(cls, name: str, tokenizer: Any) -> "ReasoningTags":
        """The parser `name` for this tokenizer, which must have <think> and </think> as single tokens."""
        check_parser_name(name)
        ids = [tokenizer.token_to_id(tag) if hasattr(tokenizer, "token_to_id") else None for tag in (START, END)]
        if None in ids:
            raise ValueError(f"--reasoning-parser {name}: the model's tokenizer has no {START} and {END} tokens, so "
                             f"it is not a reasoning model this parser reads")
        return cls(name, ids[0], ids[1], PARSERS[name])

    def starts_in_reasoning(self, prompt_ids: list[int]) -> bool | None:
        """True: the prompt left the model thinking; False: it closed the thinking; None: it says neither."""
        for token in reversed(prompt_ids):
            if token == self.start_id:
                return True
            if token == self.end_id:
                return False
        return None

    def grammar_waits(self, prompt_ids: list[int]) -> bool:
        """Whether a grammar must wait for </think>: the output starts as thinking, or may open it (the
        grammar cannot allow <think> and its own first tokens at once, so qwen3 after an untagged prompt
        answers in the grammar from its first token)."""
        state = self.starts_in_reasoning(prompt_ids)
        return state if state is not None else self.untagged_is_reasoning

    def splitter(self, prompt_ids: list[int]) -> "ReasoningSplitter":
        state = self.starts_in_reasoning(prompt_ids)
        return ReasoningSplitter(self.untagged_is_reasoning if state is None else state)


class ReasoningSplitter:
    """Splits one output's text, delta by delta, into (thinking, answer) deltas; streamed == whole.

    A leading <think> (after any whitespace) opens thinking whatever the prompt said; </think> closes it and
    the whitespace after it is dropped. Text that may be the start of a tag is held until it is decided.
    """

    def __init__(self, in_reasoning: bool) -> None:
        self._in_reasoning_at_start = in_reasoning
        self._state = "start"  # start -> reasoning -> answer, or start -> answer
        self._held = ""
        self.reasoning: str | None = None  # None: the output never thought
        self.content: str | None = None  # None: no answer (yet)

    def feed(self, text: str) -> tuple[str, str]:
        return self._advance(text, final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance("", final=True)

    def _advance(self, text: str, final: bool) -> tuple[str, str]:
        buf, thought, answer = self._held + text, "", ""
        while True:
            if self._state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(START):
                    buf, self._state = stripped[len(START):], "reasoning"
                    continue
                if not final and START.startswith(stripped):  # only whitespace or part of <think> so far
                    break
                self._state = "reasoning" if self._in_reasoning_at_start else "answer"
                continue
            if self._state == "reasoning":
                if self.reasoning is None:
                    self.reasoning = ""
                end = buf.find(END)
                if end >= 0:
                    thought += buf[:end]
                    buf, self._state = buf[end + len(END):].lstrip(), "answer"
                    if not buf and not final:  # the whitespace after </think> may go on in the next delta
                        self._state = "answer-start"
                        break
                    continue
                keep = 0 if final else _tag_prefix_len(buf, END)
                thought, buf = thought + buf[: len(buf) - keep], buf[len(buf) - keep:]
                break
            if self._state == "answer-start":
                buf = buf.lstrip()
                if not buf and not final:
                    break
                self._state = "answer"
            answer, buf = answer + buf, ""
            if self.content is None:
                self.content = ""
            break
        self._held = buf
        if thought:
            self.reasoning = (self.reasoning or "") + thought
        if answer:
            self.content += answer
        return thought, answer


def _tag_prefix_len(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (text that may yet become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
