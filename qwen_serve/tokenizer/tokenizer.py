"""The tokenizer of a model folder: `tokenizers` for text <-> ids, plus what transformers keeps beside it.

A folder carries tokenizer.json (the fast tokenizer: vocab, merges, pre-tokenizer, added tokens),
tokenizer_config.json (special-token names, the chat template) and optionally generation_config.json
(extra end-of-sequence ids) and chat_template.jinja (where newer transformers save the template).
This class reads them once and answers everything the engine and server need.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from qwen_serve.tokenizer.chat_template import ChatTemplate, ChatTemplateError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GIL_FREE_CHARS = 4096  # texts longer than this are encoded with the GIL released
# Stand-ins for special tokens written inside message content (`protect_special_tokens`): code points of
# Unicode's Supplementary Private Use Area-B, which no encoding assigns and text almost never holds.
_STAND_IN_BASE = 0x10F800
_STAND_INS = re.compile("([\U0010F800-\U0010FFFD])")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(entry: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _pick_template(config: dict[str, Any], folder: Path) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids, special tokens, end-of-sequence ids and the chat template of one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        name: str = "tokenizer",
    ) -> None:
        self.backend = backend
        self.name = name
        config = config or {}
        generation_config = generation_config or {}
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_NAMES:
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        # Added tokens flagged special are dropped by decode(skip_special_tokens=True); the
        # tokenizer.json flags and tokenizer_config.json's added_tokens_decoder agree in HF checkpoints.
        self.all_special_ids: set[int] = {
            tok_id for tok_id, tok in backend.get_added_tokens_decoder().items() if tok.special
        }
        for text in self.special_tokens.values():
            tok_id = backend.token_to_id(text)
            if tok_id is not None:
                self.all_special_ids.add(tok_id)
        eos: list[int] = []
        eos_text = self.special_tokens.get("eos_token")
        if eos_text is not None and backend.token_to_id(eos_text) is not None:
            eos.append(backend.token_to_id(eos_text))
        eos.extend(_ids(generation_config.get("eos_token_id")))
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        bos_text = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos_text) if bos_text else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # The most input characters one token can stand for: a text longer than max_chars(n) cannot be
        # n tokens or fewer, which the server checks before tokenizing (seconds for megabytes).
        self.max_token_chars = max(len(t) for t in backend.get_vocab(with_added_tokens=True))
        specials = [tok.content for tok_id, tok in sorted(backend.get_added_tokens_decoder().items()) if tok.special]
        self._specials = specials[: 0x10FFFD - _STAND_IN_BASE]
        self._special_pattern = (re.compile("|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)))
                                 if self._specials else None)
        self._literal_ids: dict[str, list[int]] = {}  # special token -> the ids of its text read as text
        self._template = ChatTemplate(chat_template) if chat_template else None

    @classmethod
    def from_folder(cls, folder: str | Path, chat_template: str | None = None) -> "Tokenizer":
        """The tokenizer files of a model folder; `chat_template` (template text) replaces the folder's own."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder} (qwen-serve needs the fast tokenizer file)")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for unreadable files
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        try:
            template = chat_template if chat_template is not None else _pick_template(config, folder)
            return cls(backend, config, _read_json(folder / "generation_config.json"), template, name=str(folder))
        except ChatTemplateError as e:
            raise ValueError(f"{folder}: {e}") from None

    # -- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False, literal_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (with `literal_special_tokens`, of a text made from `protect_special_tokens`'
        output, whose stand-ins become their tokens' text). Long texts go through `encode_batch`, which releases the GIL while the Rust
        side works (`encode` holds it: 0.6 s of a 1.6 MB text stopped every other thread, measured), so a
        server tokenizing on a worker thread keeps answering. Text that is not valid Unicode (a lone
        surrogate, which JSON's \\ud800 escapes can carry) is a ValueError naming where it is."""
        if literal_special_tokens and _STAND_INS.search(text):
            return self._encode_literal_special_tokens(text, add_special_tokens)
        try:
            if len(text) > _GIL_FREE_CHARS:
                return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is None:
                raise
            raise ValueError(f"the text is not valid Unicode: a lone surrogate \\u{ord(text[bad]):04x} at character "
                             f"{bad}") from None

    def protect_special_tokens(self, value: Any) -> Any:
        """`value` (a message list, tool definitions: any JSON-like structure) with every special token written
        in its strings replaced by a stand-in character, which `encode(..., literal_special_tokens=True)`
        reads back as the token's text. So user content cannot forge turns (`<|im_start|>system`), as
        OpenAI's API does not let it; the template's own control tokens stay tokens."""
        if self._special_pattern is None:
            return value
        if isinstance(value, str):
            return self._special_pattern.sub(lambda m: chr(_STAND_IN_BASE + self._specials.index(m.group())), value)
        if isinstance(value, list):
            return [self.protect_special_tokens(v) for v in value]
        if isinstance(value, dict):
            return {k: v if k == "role" else self.protect_special_tokens(v) for k, v in value.items()}
        return value

    def _encode_literal_special_tokens(self, text: str, add_special_tokens: bool) -> list[int]:
        """Text with stand-ins: the pieces between them encoded as usual, each stand-in as its token's text."""
        ids: list[int] = []
        for i, part in enumerate(_STAND_INS.split(text)):
            if i % 2 == 0:
                if part:
                    ids += self.encode(part, add_special_tokens=add_special_tokens and not ids)
                continue
            token = self._specials[ord(part) - _STAND_IN_BASE] if ord(part) - _STAND_IN_BASE < len(self._specials) else part
            if token not in self._literal_ids:
                plain = BackendTokenizer.from_str(self.backend.to_str())
                plain.encode_special_tokens = True  # a copy: the shared tokenizer stays as it is for other threads
                self._literal_ids[token] = plain.encode(token, add_special_tokens=False).ids
            ids += self._literal_ids[token]
        return ids

    def max_chars(self, num_tokens: int) -> int:
        """Characters beyond which a text cannot be `num_tokens` tokens or fewer: each token stands for at
        most `max_token_chars` of them, twice that for the normalizer's room (NFC composing a character
        and its marks into one)."""
        return num_tokens * self.max_token_chars * 2

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self._template.source if self._template else None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """The prompt text for a conversation, rendered by the model's own template.

        continue_final_message: end the text inside the last message (its end-of-turn left out), so the
        model continues it, as transformers does: the message is rendered with a marker after its
        content and the text is cut at the marker."""
        if self._template is None:
            raise ChatTemplateError(f"{self.name} has no chat template; give one with --chat-template, or send plain "
                                    "prompts to /v1/completions instead")
        if continue_final_message:
            if add_generation_prompt:
                raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true")
            final = messages[-1].get("content") if messages else None
            if not isinstance(final, str):
                raise ChatTemplateError("continue_final_message: the final message has no text content to continue")
            messages = [*messages[:-1], {**messages[-1], "content": final + _CONTINUE_TAG}]
        # transformers passes the special-token strings (bos_token, eos_token, ...) to every template.
        text = self._template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens, **extra})
        if not continue_final_message:
            return text
        tag = _CONTINUE_TAG.strip()
        if tag not in text or final.strip() not in text:
            raise ChatTemplateError("continue_final_message: the template does not show the final message's content")
        at = text.rindex(tag)
        # A template that strips the content's trailing spaces also stripped the marker's space.
        return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, so both cut at the same place


def _clean_up(text: str) -> str:
    """transformers' `clean_up_tokenization` (only for tokenizers whose config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
