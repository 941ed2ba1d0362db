"""Reasoning models' <think>...</think> split into reasoning_content (--reasoning-parser): the splitter on
every way a text can be cut into deltas, the prompt rules, and the server on a tiny model whose tokenizer
has the tags (an R1-style template that opens <think> in the prompt), through the openai SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_serve.server.reasoning import ReasoningSplitter, ReasoningTags

from conftest import make_tiny_checkpoint

CASES = [
    # (starts in reasoning, output text, expected reasoning, expected content)
    (True, "I add 2 and 2.</think>\n\nIt is 4.", "I add 2 and 2.", "It is 4."),
    (True, "<think>\nI add.</think>4", "\nI add.", "4"),
    (True, "still thinking <", "still thinking <", None),
    (True, "", "", None),
    (False, "Just an answer.", None, "Just an answer."),
    (False, "  <think>a</think> b", "a", "b"),
    (False, "<thin", None, "<thin"),
    (True, "a</think>", "a", ""),
    (True, "x </think> y </think> z", "x ", "y </think> z"),
]


@pytest.mark.parametrize("start,text,reasoning,content", CASES)
def test_splitter_whole_and_every_split(start, text, reasoning, content):
    """One feed, and the text cut at every pair of points into three deltas: the same split each time."""
    cuts = [(i, j) for i in range(len(text) + 1) for j in range(i, len(text) + 1)]
    for i, j in [(len(text), len(text))] + cuts:
        s = ReasoningSplitter(start)
        thought, answer = "", ""
        for part in (text[:i], text[i:j], text[j:]):
            t, a = s.feed(part)
            thought, answer = thought + t, answer + a
        t, a = s.finish()
        thought, answer = thought + t, answer + a
        assert (s.reasoning, s.content) == (reasoning, content), (i, j)
        assert (thought, answer) == (reasoning or "", content or ""), (i, j)


class _Tok:
    def __init__(self, tags: bool) -> None:
        self.ids = {"<think>": 7, "</think>": 8} if tags else {}

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)


def test_prompt_decides_where_thinking_starts():
    r1, qwen3 = ReasoningTags.of("deepseek_r1", _Tok(True)), ReasoningTags.of("qwen3", _Tok(True))
    assert r1.starts_in_reasoning([1, 7, 2]) is True and r1.starts_in_reasoning([7, 2, 8, 3]) is False
    assert r1.starts_in_reasoning([1, 2]) is None
    assert r1.grammar_waits([1, 2]) and not qwen3.grammar_waits([1, 2])  # untagged: R1 thinks, Qwen3 answers
    assert qwen3.grammar_waits([7]) and not r1.grammar_waits([7, 1, 8])


def test_unknown_parser_or_model_without_tags_is_refused():
    with pytest.raises(ValueError, match=r"--reasoning-parser 'o1' is not supported; supported: \('deepseek_r1', "):
        ReasoningTags.of("o1", _Tok(True))
    with pytest.raises(ValueError, match="has no <think> and </think> tokens"):
        ReasoningTags.of("qwq", _Tok(False))


# ---------------------------------------------------------------- through the server

R1_STYLE_TEMPLATE = (  # written for this test: ChatML turns, the generation prompt opening <think> as R1's does
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def reasoning_checkpoint(demo_folder: Path, tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the demo's tokenizer plus <think> and </think> (not special, as in
    R1-Distill-Qwen, so they stay in the text), and the template above."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(demo_folder / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("reasoning") / "model",
                                  vocab=-(-tok.get_vocab_size() // 64) * 64, max_pos=4096)
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_folder / name, folder / name)
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = R1_STYLE_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(reasoning_checkpoint: Path, tmp_path_factory):
    from server_process import ServerProcess

    proc = ServerProcess(reasoning_checkpoint, tmp_path_factory.mktemp("rs") / "server.log", "--served-model-name",
                         "r1", "--reasoning-parser", "deepseek_r1", "--generation-config", "vllm")
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "What colour is the sky?"}]


def _end_id(server) -> int:
    import httpx

    return httpx.post(f"{server.base_url}/tokenize", json={"prompt": "</think>"}, timeout=30).json()["tokens"][-1]


def _raw(client, **kw) -> str:
    """The model's own text for the chat prompt, from /v1/completions on the rendered prompt."""
    import httpx

    prompt = "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    body = {"model": "r1", "prompt": prompt, "temperature": 0, **kw}
    return httpx.post(f"{client.base_url}completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_thinking_without_an_end_is_all_reasoning(client):
    out = client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=8, temperature=0)
    message = out.choices[0].message
    assert message.reasoning_content == _raw(client, max_tokens=8) and message.content is None


def test_answer_after_think_end_streamed_as_whole(client, server):
    bias = {str(_end_id(server)): 100}  # </think> first: thinking is empty, the rest is the answer
    whole = client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=6, temperature=0,
                                           logit_bias=bias).choices[0].message
    raw = _raw(client, max_tokens=6, logit_bias=bias)  # </think> again and again: only the first one closes
    assert raw.startswith("</think>") and whole.reasoning_content == ""
    assert whole.content == raw.removeprefix("</think>").lstrip()
    thought, answer = "", ""
    for chunk in client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=6, temperature=0,
                                                logit_bias=bias, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        thought += (getattr(delta, "reasoning_content", None) or "") if delta else ""
        answer += (delta.content or "") if delta else ""
    assert (thought, answer) == ("", whole.content)


def test_json_output_constrains_the_answer_not_the_thinking(client, server):
    """The grammar waits for </think>: the first token (</think>, pushed by logit_bias, which no JSON
    grammar allows) is taken, then the answer is exactly the schema's one value."""
    schema = {"type": "object", "properties": {"sky": {"type": "string", "enum": ["blue"]}}, "required": ["sky"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "sky", "schema": schema, "strict": True}}
    out = client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=40, temperature=0,
                                         logit_bias={str(_end_id(server)): 100}, response_format=fmt)
    message = out.choices[0].message
    assert message.reasoning_content == ""
    assert json.loads(message.content) == {"sky": "blue"} and out.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=5, temperature=0,
                                          response_format=fmt).choices[0].message
    # No </think> in 5 tokens: all thinking, unconstrained (the model's own greedy text).
    assert free.content is None and free.reasoning_content == client.chat.completions.create(
        model="r1", messages=MESSAGES, max_tokens=5, temperature=0).choices[0].message.reasoning_content


def test_server_refuses_a_parser_for_a_model_without_tags(tiny_chat_checkpoint: Path, tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "qwen_serve.cli", "serve", "--model", str(tiny_chat_checkpoint),
                          "--port", "0", "--reasoning-parser", "qwen3", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "has no <think> and </think> tokens" in run.stderr, run.stderr[-2000:]


def test_responses_api_returns_thinking_as_a_reasoning_item(client):
    """/v1/responses: the thinking is a reasoning item (its tokens counted as reasoning tokens), streamed as
    reasoning_text deltas that add up to it."""
    resp = client.responses.create(model="r1", input=MESSAGES[0]["content"], max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=8, temperature=0)
    assert [item.type for item in resp.output] == ["reasoning"]
    assert resp.output[0].content[0].text == chat.choices[0].message.reasoning_content
    assert resp.usage.output_tokens_details.reasoning_tokens == 8
    events = list(client.responses.create(model="r1", input=MESSAGES[0]["content"], max_output_tokens=8,
                                          temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == resp.output[0].content[0].text


def test_tool_calls_are_read_from_the_answer(client, server):
    """tool_choice required: the grammar of <tool_call> blocks waits for </think> too, and the call is parsed
    from the answer, never from the thinking."""
    tools = [{"type": "function", "function": {"name": "paint", "parameters": {
        "type": "object", "properties": {"colour": {"enum": ["blue", "grey"]}}, "required": ["colour"],
        "additionalProperties": False}}}]
    out = client.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=60, temperature=0, tools=tools,
                                         tool_choice="required", logit_bias={str(_end_id(server)): 100})
    message = out.choices[0].message
    assert message.reasoning_content == "" and out.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == "paint"
    assert json.loads(message.tool_calls[0].function.arguments)["colour"] in ("blue", "grey")
