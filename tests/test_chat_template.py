"""Chat templates: parity with transformers' apply_chat_template on the demo model's own template,
and the sandbox's helpers and errors on small inline templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_serve.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from qwen_serve.tokenizer.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city. Returns <b>°C</b> & more.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市名"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}},
]

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    "multi_turn": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "Write `print(1)` in Python."},
        {"role": "assistant", "content": "```python\nprint(1)\n```"},
        {"role": "user", "content": "Thanks"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris and Tokyo, and the time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京", "unit": "c"}}},
            ],
        },
        {"role": "tool", "content": json.dumps({"temp": 18})},
        {"role": "tool", "content": "{\"temp\": 25}"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Paris 18 °C, Tokyo 25 °C, noon."},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.mark.demo
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(demo_folder: Path, hf_demo_tokenizer, name: str, with_tools: bool,
                              add_generation_prompt: bool) -> None:
    tok = Tokenizer.from_folder(demo_folder)
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    ref = hf_demo_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    if with_tools:
        assert '"description": "城市名"' in ours and "<b>°C</b> & more" in ours  # tojson: no escaping


@pytest.mark.demo
@pytest.mark.parametrize("partial", ["Sure, here is", "Sure, ", "```python\n", "好的，"])
def test_continue_final_message_matches_transformers(demo_folder: Path, hf_demo_tokenizer, partial: str) -> None:
    """The prompt ends inside the assistant's unfinished reply, as transformers cuts it (a trailing space
    included when the template keeps it)."""
    tok = Tokenizer.from_folder(demo_folder)
    messages = CONVERSATIONS["multi_turn"] + [{"role": "assistant", "content": partial}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    ref = hf_demo_tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                                tokenize=False)
    assert ours == ref and ours.endswith("<|im_start|>assistant\n" + partial)
    with pytest.raises(ChatTemplateError, match="add_generation_prompt"):
        tok.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="no text content"):
        tok.apply_chat_template(messages[:-1] + [{"role": "assistant", "content": None}], add_generation_prompt=False,
                                continue_final_message=True)


@pytest.mark.demo
def test_demo_template_error_becomes_chat_template_error(demo_folder: Path) -> None:
    tok = Tokenizer.from_folder(demo_folder)
    with pytest.raises(ChatTemplateError):  # the template concatenates a None content
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}])


def test_tojson_follows_transformers() -> None:
    t = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}")
    x = {"b": "<é>&'", "a": [1, 2.5, None, True]}
    out = t.render([{"role": "user", "content": ""}], x=x).split("|")
    assert out == [json.dumps(x, ensure_ascii=False), json.dumps(x, ensure_ascii=False, indent=2),
                   json.dumps(x, ensure_ascii=False, sort_keys=True)]


def test_trim_blocks_lstrip_blocks_and_globals() -> None:
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}{{ strftime_now('%Y') | length }}"
    assert ChatTemplate(src).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n4"
    ns = "{% set n = namespace(c=0) %}{% for m in messages %}{% set n.c = n.c + 1 %}{% endfor %}{{ n.c }}"
    assert ChatTemplate(ns).render([{"role": "user", "content": "x"}] * 3) == "3"


def test_raise_exception_becomes_chat_template_error() -> None:
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        t.render([{"role": "assistant", "content": "x"}])


def test_template_syntax_and_sandbox_errors() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute access to internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set n = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user"}], "needs a 'content'"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"role": "user", "content": ["x"]}], "content part must be an object"),
        ([{"role": "assistant", "content": "", "tool_calls": "f()"}], "tool_calls must be a list"),
        ([{"role": "user", "content": "x", "meta": object()}], "cannot be passed"),
    ],
)
def test_bad_message_lists(messages, match: str) -> None:
    t = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match=match):
        t.render(messages)


def test_bad_tools() -> None:
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        ChatTemplate("x").render([{"role": "user", "content": "x"}], tools={"name": "f"})


# -- --chat-template: a template given at start-up instead of the model's own ------------------------------
# ChatML written for these tests (a base model has no template of its own to fall back on).
CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_chat_checkpoint: Path) -> Path:
    """The tiny chat checkpoint as a base model: its tokenizer_config.json without a chat template."""
    import shutil

    folder = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_chat_checkpoint, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_template_flag_reads_a_file_or_takes_the_template(tmp_path: Path) -> None:
    from qwen_serve.config import EngineConfig
    from qwen_serve.tokenizer.chat_template import read_chat_template

    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML, encoding="utf-8")
    assert read_chat_template(str(path)) == CHATML
    assert read_chat_template(CHATML) == CHATML  # not a file, but Jinja
    with pytest.raises(ChatTemplateError, match="neither a readable file"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    # Refused when the engine's configuration is made, before any weight is read.
    with pytest.raises(ValueError, match="--chat-template: .*neither a readable file"):
        EngineConfig(chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="--chat-template: the chat template does not compile"):
        EngineConfig(chat_template="{% for m in messages %}")


def test_chat_template_flag_lets_a_base_model_chat(base_checkpoint: Path, tmp_path: Path) -> None:
    """A base model (no template) refuses chat naming the flag; with --chat-template it renders the chat as
    transformers does with that template, through a real server's /tokenize and the openai SDK."""
    import httpx
    import openai
    from transformers import AutoTokenizer

    from server_process import ServerProcess

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        Tokenizer.from_folder(base_checkpoint).apply_chat_template(messages)
    theirs = AutoTokenizer.from_pretrained(base_checkpoint)
    expected = theirs.apply_chat_template(messages, chat_template=CHATML, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML, encoding="utf-8")
    proc = ServerProcess(base_checkpoint, tmp_path / "server.log", "--served-model-name", "base",
                         "--chat-template", str(path))
    try:
        assert httpx.post(f"{proc.base_url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"] == expected
        client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="base", messages=messages, max_tokens=3, temperature=0)
        assert out.usage.prompt_tokens == len(expected) and out.usage.completion_tokens >= 1
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]
