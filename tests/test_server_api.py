"""The OpenAI-compatible server, end to end: a real `qwen-serve serve` process on a loopback port
serving a tiny random model (demo tokenizer), driven by the official `openai` SDK and raw HTTP.

One server for the module (float32 on CPU, so greedy decoding is deterministic); tests run in file
order and each leaves the engine idle, which the KV-block checks rely on.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_process import ServerProcess, metrics, wait_idle

API_KEY = "sk-test-0123456789"
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(
        tiny_chat_checkpoint, tmp_path_factory.mktemp("server") / "server.log",
        "--served-model-name", MODEL, "--num-kv-blocks", "4096", "--max-num-seqs", "128",
        "--max-request-body-mb", "1", "--generation-config", "vllm",
        api_key=API_KEY,
    )
    yield proc
    code = proc.stop()
    assert code == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about tea."}]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


# ------------------------------------------------------------------ basics


def test_health_models_and_key(server: ServerProcess, client: openai.OpenAI):
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # open without the key
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"


def test_chat_non_streaming_usage_and_logprobs(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens >= 1
    for pos in content:
        assert len(pos.top_logprobs) == 3
        tops = [t.logprob for t in pos.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        # greedy: the chosen token is the most likely one
        assert pos.logprob == pytest.approx(tops[0], abs=1e-4)
        assert pos.bytes == list(pos.token.encode())


def test_chat_stream_equals_non_stream_for_greedy(client: openai.OpenAI):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    with_lp = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, logprobs=True,
                                                  top_logprobs=2, **GREEDY))
    positions = [p for c in with_lp if c.choices and c.choices[0].logprobs for p in c.choices[0].logprobs.content]
    assert len(positions) == full.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in with_lp if c.choices) == full.choices[0].message.content


def test_chat_content_parts_and_roles(client: openai.OpenAI):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Call the tool."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "user", "content": "And?"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")


def test_n_and_seed(client: openai.OpenAI):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(n=2, seed=1234, **kw)
    b = client.chat.completions.create(n=2, seed=1234, **kw)
    c = client.chat.completions.create(n=2, seed=99, **kw)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert a.usage.completion_tokens == 16
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # the two samples are not copies of each other
    streamed = ["", ""]
    finishes = {}
    for chunk in client.chat.completions.create(n=2, seed=1234, stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert streamed == texts(a) and finishes == {0: "length", 1: "length"}


def test_logit_bias_and_allowed_token_ids(client: openai.OpenAI, http: httpx.Client):
    """+100 on one token makes greedy decoding pick it at every step, and the sampled token's logprob
    stays the model's (below the unbiased greedy token's), as in vLLM; allowing only that token does too."""
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw)
    token_id = http.post("/tokenize", json={"model": MODEL, "prompt": " fox"}).json()["tokens"][-1]
    expected = http.post("/detokenize", json={"model": MODEL, "tokens": [token_id] * 4}).json()["prompt"]
    forced = client.completions.create(logit_bias={str(token_id): 100}, **kw)
    assert forced.choices[0].text == expected != plain.choices[0].text
    assert forced.choices[0].logprobs.token_logprobs[0] < plain.choices[0].logprobs.token_logprobs[0]
    only = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "allowed_token_ids": [token_id]}})
    assert only.choices[0].text == expected


def test_suffix_fills_in_the_middle(client: openai.OpenAI, http: httpx.Client):
    """`suffix` asks for the middle, in Qwen2.5-Coder's prompt format (this model has the demo's tokenizer)."""
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    fim = "<|fim_prefix|>" + prefix + "<|fim_suffix|>" + suffix + "<|fim_middle|>"
    expected = http.post("/tokenize", json={"model": MODEL, "prompt": fim}).json()["count"]
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == expected and r.usage.completion_tokens == 4
    plain = client.completions.create(model=MODEL, prompt=prefix, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.usage.prompt_tokens < expected


def test_continue_final_message(client: openai.OpenAI, http: httpx.Client):
    """An unfinished assistant message is continued (as vLLM's continue_final_message): the prompt
    ends inside it, /tokenize agrees, and the reply holds only the continuation."""
    partial = [*CHAT, {"role": "assistant", "content": "Green leaves"}]
    body = {"model": MODEL, "messages": partial, "add_generation_prompt": False, "continue_final_message": True}
    tokens = http.post("/tokenize", json=body).json()["tokens"]
    text = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nGreen leaves")
    r = client.chat.completions.create(model=MODEL, messages=partial, max_tokens=6, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True,
                                                   "ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokens) and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=partial, max_tokens=6,
                                       extra_body={"continue_final_message": True})
    assert e.value.body["param"] == "continue_final_message"


def test_stop_string(client: openai.OpenAI):
    base = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"need a visible stop string in {text!r}"
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_completions_shapes(client: openai.OpenAI, http: httpx.Client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "Bonjour"], n=2, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples alike
    assert r.usage.completion_tokens == 16
    ids = http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in batch.choices] == [r.choices[0].text] * 2
    echo = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, echo=True,
                                     extra_body={"ignore_eos": True})
    assert echo.choices[0].text == "Hello" + r.choices[0].text
    lp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == lp.usage.completion_tokens
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text
    assert all(len(t) >= 1 for t in lp.choices[0].logprobs.top_logprobs)


def test_completions_stream_equals_non_stream(client: openai.OpenAI):
    kw = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


SCORED = "def add(a, b):\n    return a + b  # sums"


def test_completions_echo_max_tokens_zero_scores_the_prompt(client: openai.OpenAI, tiny_chat_checkpoint: Path):
    """What lm-eval-harness's loglikelihood requests send: the prompt back with its logprobs, nothing generated."""
    from qwen_serve import LLM, SamplingParams

    r = client.completions.create(model=MODEL, prompt=SCORED, echo=True, logprobs=1, max_tokens=0)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == SCORED and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and len(lp.tokens) == r.usage.prompt_tokens
    assert "".join(lp.tokens) == SCORED
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])  # the best token, and the prompt's if not it
    llm = LLM(model=str(tiny_chat_checkpoint), dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=512)
    ids = llm.get_tokenizer().encode(SCORED)
    engine = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0].prompt_logprobs
    assert lp.token_logprobs[1:] == pytest.approx([pos[t].logprob for t, pos in zip(ids[1:], engine[1:])], abs=1e-4)


def test_completions_echo_logprobs_cover_prompt_then_completion(client: openai.OpenAI, http: httpx.Client):
    kw = dict(model=MODEL, prompt=SCORED, max_tokens=3, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    scored = client.completions.create(model=MODEL, prompt=SCORED, echo=True, logprobs=1, max_tokens=0).choices[0]
    plain = client.completions.create(**kw).choices[0]
    echo = client.completions.create(echo=True, **kw).choices[0]
    n = len(scored.logprobs.tokens)
    assert echo.text == SCORED + plain.text and len(echo.logprobs.tokens) == n + 3
    assert echo.logprobs.tokens == scored.logprobs.tokens + plain.logprobs.tokens
    assert echo.logprobs.token_logprobs[0] is None
    assert echo.logprobs.token_logprobs[1:] == pytest.approx(
        scored.logprobs.token_logprobs[1:] + plain.logprobs.token_logprobs, abs=1e-4)
    assert echo.logprobs.text_offset == scored.logprobs.text_offset + [len(SCORED) + o for o in plain.logprobs.text_offset]
    chunks = [c.choices[0] for c in client.completions.create(echo=True, stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == echo.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == echo.logprobs.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == echo.logprobs.text_offset
    # vLLM's prompt_logprobs field: token id -> {logprob, rank, decoded_token}, the top 2 and the prompt's.
    extra = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "prompt_logprobs": 2}}).choices[0]
    ids = http.post("/tokenize", json={"prompt": SCORED}).json()["tokens"]
    entries = extra.model_extra["prompt_logprobs"]
    assert len(entries) == n == len(ids) and entries[0] is None
    for tok, logprob, entry in zip(ids[1:], scored.logprobs.token_logprobs[1:], entries[1:]):
        assert entry[str(tok)]["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert {e["rank"] for e in entry.values()} >= {1, 2} and len(entry) <= 3


def test_tokenize_detokenize(http: httpx.Client):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"])
    back = http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]})
    assert back.json()["prompt"] == "hello world"
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > r.json()["count"]


# ------------------------------------------------------------------ abuse


def _chat(**over):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **over}


def _cmpl(**over):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **over}


CHATP, CMPLP = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    # (name, method, path, json body or raw bytes, headers override, status, expected param or code)
    ("malformed json", "POST", CHATP, b'{"model": "tiny", "messages": [', None, 400, None),
    ("empty body", "POST", CHATP, b"", None, 400, None),
    ("body is a list", "POST", CHATP, b"[1, 2]", None, 400, None),
    ("body is text", "POST", CHATP, b"hello", {"Content-Type": "text/plain"}, 400, None),
    ("deeply nested json", "POST", CHATP, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400, None),
    ("missing messages", "POST", CHATP, {"model": MODEL}, None, 400, "messages"),
    ("empty messages", "POST", CHATP, _chat(messages=[]), None, 400, "messages"),
    ("unknown role", "POST", CHATP, _chat(messages=[{"role": "wizard", "content": "x"}]), None, 400, "messages.0.role"),
    ("content is a number", "POST", CHATP, _chat(messages=[{"role": "user", "content": 5}]), None, 400, None),
    ("image part", "POST", CHATP, _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), None, 400, None),
    ("tool call without function", "POST", CHATP, _chat(messages=[{"role": "assistant", "tool_calls": [{"id": "1"}]}]),
     None, 400, None),
    ("negative temperature", "POST", CHATP, _chat(temperature=-0.5), None, 400, "temperature"),
    ("temperature 1e308", "POST", CHATP, _chat(temperature=1e308), None, 400, "temperature"),
    ("temperature Infinity", "POST", CHATP, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": Infinity}', None, 400, "temperature"),
    ("user message w/o content", "POST", CHATP, _chat(messages=[{"role": "user"}]), None, 400, "messages.0"),
    ("system message w/o content", "POST", CHATP, _chat(messages=[{"role": "system"}, {"role": "user", "content": "x"}]),
     None, 400, "messages.0"),
    ("tool message w/o tool_call_id", "POST", CHATP, _chat(messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "content": "12:00"}]), None, 400, "messages.2"),
    ("stop empty string", "POST", CHATP, _chat(stop=[""]), None, 400, "stop"),
    ("tool parameters not a schema", "POST", CHATP, _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objekt"}}}], tool_choice="auto"), None, 400, "tools.0.function.parameters"),
    ("top_p zero", "POST", CHATP, _chat(top_p=0), None, 400, "top_p"),
    ("top_p above one", "POST", CHATP, _chat(top_p=1.5), None, 400, "top_p"),
    ("n zero", "POST", CHATP, _chat(n=0), None, 400, "n"),
    ("n huge", "POST", CHATP, _chat(n=100_000), None, 400, "n"),
    ("max_tokens zero", "POST", CHATP, _chat(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens negative", "POST", CHATP, _chat(max_tokens=-5), None, 400, "max_tokens"),
    ("max_tokens over context", "POST", CHATP, _chat(max_tokens=10**9), None, 400, "context_length_exceeded"),
    ("prompt over context", "POST", CHATP, _chat(messages=[{"role": "user", "content": "hello " * 5000}]),
     None, 400, "context_length_exceeded"),
    ("presence_penalty 5", "POST", CHATP, _chat(presence_penalty=5), None, 400, "presence_penalty"),
    ("frequency_penalty -3", "POST", CHATP, _chat(frequency_penalty=-3), None, 400, "frequency_penalty"),
    ("top_logprobs 50", "POST", CHATP, _chat(logprobs=True, top_logprobs=50), None, 400, "top_logprobs"),
    ("top_logprobs w/o logprobs", "POST", CHATP, _chat(top_logprobs=2), None, 400, "top_logprobs"),
    ("stop is a number", "POST", CHATP, _chat(stop=7), None, 400, "stop"),
    ("too many stop strings", "POST", CHATP, _chat(stop=["x"] * 100), None, 400, "stop"),
    ("seed not a number", "POST", CHATP, _chat(seed="abc"), None, 400, "seed"),
    ("seed too large", "POST", CHATP, _chat(seed=2**70), None, 400, "seed"),
    ("logit_bias key not a token id", "POST", CHATP, _chat(logit_bias={"ten": 5}), None, 400, "logit_bias"),
    ("logit_bias token past vocab", "POST", CHATP, _chat(logit_bias={"999999999": 5}), None, 400, "logit_bias"),
    ("vLLM beam search", "POST", CHATP, _chat(use_beam_search=True), None, 400, "use_beam_search"),
    ("allowed_token_ids past vocab", "POST", CMPLP, _cmpl(allowed_token_ids=[999_999_999]), None, 400, "allowed_token_ids"),
    ("allowed_token_ids empty", "POST", CMPLP, _cmpl(allowed_token_ids=[]), None, 400, "allowed_token_ids"),
    ("vLLM truncate_prompt_tokens", "POST", CMPLP, _cmpl(truncate_prompt_tokens=5), None, 400, "truncate_prompt_tokens"),
    ("vLLM chat echo", "POST", CHATP, _chat(echo=True), None, 400, "echo"),
    ("vLLM chat prompt_logprobs", "POST", CHATP, _chat(prompt_logprobs=1), None, 400, "prompt_logprobs"),
    ("stream_options w/o stream", "POST", CHATP, _chat(stream_options={"include_usage": True}), None, 400,
     "stream_options"),
    ("min_tokens over max_tokens", "POST", CHATP, _chat(min_tokens=10, max_tokens=2), None, 400, "min_tokens"),
    ("repetition_penalty zero", "POST", CHATP, _chat(repetition_penalty=0), None, 400, "repetition_penalty"),
    ("top_k -5", "POST", CHATP, _chat(top_k=-5), None, 400, "top_k"),
    ("tool_choice w/o tools", "POST", CHATP, _chat(tool_choice="required"), None, 400, "tool_choice"),
    ("json_schema w/o schema", "POST", CHATP, _chat(response_format={"type": "json_schema", "json_schema": {}}),
     None, 400, "response_format"),
    ("unknown model", "POST", CHATP, _chat(model="gpt-17"), None, 404, "model_not_found"),
    ("no api key", "POST", CHATP, _chat(), {"Authorization": ""}, 401, "invalid_api_key"),
    ("wrong api key", "POST", CHATP, _chat(), {"Authorization": "Bearer sk-nope"}, 401, "invalid_api_key"),
    ("basic auth scheme", "POST", CHATP, _chat(), {"Authorization": f"Basic {API_KEY}"}, 401, "invalid_api_key"),
    ("body over limit", "POST", CHATP, _chat(messages=[{"role": "user", "content": "x" * 1_500_000}]), None, 413,
     "request_too_large"),
    ("missing prompt", "POST", CMPLP, {"model": MODEL}, None, 400, "prompt"),
    ("empty prompt list", "POST", CMPLP, _cmpl(prompt=[]), None, 400, "prompt"),
    ("empty prompt string", "POST", CMPLP, _cmpl(prompt=""), None, 400, "prompt"),
    ("token id past vocab", "POST", CMPLP, _cmpl(prompt=[999_999_999]), None, 400, "prompt"),
    ("negative token id", "POST", CMPLP, _cmpl(prompt=[-1]), None, 400, "prompt"),
    ("empty prompt in batch", "POST", CMPLP, _cmpl(prompt=[[1, 2], []]), None, 400, "prompt"),
    ("mixed prompt batch", "POST", CMPLP, _cmpl(prompt=["a", [1, 2]]), None, 400, "prompt"),
    ("max_tokens 0 w/o echo", "POST", CMPLP, _cmpl(max_tokens=0), None, 400, "max_tokens"),
    ("prompt_logprobs 21", "POST", CMPLP, _cmpl(prompt_logprobs=21), None, 400, "prompt_logprobs"),
    ("prompt_logprobs streamed", "POST", CMPLP, _cmpl(prompt_logprobs=1, stream=True), None, 400, "prompt_logprobs"),
    ("logprobs 21", "POST", CMPLP, _cmpl(logprobs=21), None, 400, "logprobs"),
    ("suffix with echo", "POST", CMPLP, _cmpl(suffix="end", echo=True), None, 400, "suffix"),
    ("suffix with token ids", "POST", CMPLP, _cmpl(prompt=[1, 2], suffix="end"), None, 400, "suffix"),
    ("best_of != n", "POST", CMPLP, _cmpl(best_of=3), None, 400, "best_of"),
    ("tokenize nothing", "POST", "/tokenize", {"model": MODEL}, None, 400, "prompt"),
    ("detokenize strings", "POST", "/detokenize", {"tokens": ["a"]}, None, 400, "tokens.0"),
    ("unknown route", "GET", "/v1/nothing-here", None, None, 404, None),
    ("wrong method", "GET", CHATP, None, None, 405, None),
]


def test_malformed_and_abusive_requests(server: ServerProcess, http: httpx.Client, client: openai.OpenAI):
    assert len(BAD_REQUESTS) >= 30
    failures = []
    for name, method, path, body, headers, status, expect in BAD_REQUESTS:
        kwargs: dict = {"headers": headers or {}}
        if isinstance(body, bytes):
            kwargs["content"] = body
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
        elif body is not None:
            kwargs["json"] = body
        r = http.request(method, path, **kwargs)
        try:
            err = r.json()["error"]
            ok = (r.status_code == status and set(err) == {"message", "type", "param", "code"}
                  and isinstance(err["message"], str) and err["message"]
                  and (expect is None or expect in (err["param"], err["code"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    assert server.proc.poll() is None
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert r.usage.completion_tokens >= 1
    wait_idle(http)


# ------------------------------------------------------------------ metrics, load, disconnects


def test_metrics_parse_and_move(http: httpx.Client, client: openai.OpenAI):
    before = wait_idle(http)
    assert http.post("/v1/completions", json=_cmpl(temperature=-1)).status_code == 400
    r = client.completions.create(model=MODEL, prompt="Counting tokens", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = wait_idle(http)
    assert after["qwen_serve_prompt_tokens_total"] - before["qwen_serve_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["qwen_serve_generation_tokens_total"] - before["qwen_serve_generation_tokens_total"] == 5
    key = "qwen_serve_requests_finished_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == 1
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"qwen_serve_{h}_count"] - before[f"qwen_serve_{h}_count"] == 1
    ok, bad = "qwen_serve_http_responses_total{status=200}", "qwen_serve_http_responses_total{status=400}"
    assert after[ok] - before.get(ok, 0) >= 2  # the completion and the first /metrics scrape
    assert after[bad] - before.get(bad, 0) == 1
    assert after["qwen_serve_kv_blocks_total"] == 4096
    assert 0 <= after["qwen_serve_prefix_cache_hit_rate"] <= 1
    assert after["qwen_serve_kv_cache_usage_perc"] == 0


@pytest.mark.slow
def test_200_concurrent_streams_complete(server: ServerProcess, client: openai.OpenAI, http: httpx.Client):
    prompts = [f"Story number {i}: once upon a time" for i in range(8)]
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompts[i % len(prompts)], max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    health_latency: list[float] = []

    async def probe_health(done: asyncio.Event) -> None:
        # The event loop must keep answering while the engine thread is busy with 128-sequence steps.
        async with httpx.AsyncClient(base_url=server.base_url) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert (await c.get("/health")).status_code == 200
                health_latency.append(time.perf_counter() - t)
                await asyncio.sleep(0.1)

    async def all_of_them():
        done = asyncio.Event()
        probe = asyncio.create_task(probe_health(done))
        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            done.set()
            await probe
            await aclient.close()

    start = time.perf_counter()
    results = asyncio.run(all_of_them())
    elapsed = time.perf_counter() - start
    wrong = [(i, r) for i, r in enumerate(results) if r != (expected[i % len(prompts)], "length", 16)]
    assert not wrong, f"{len(wrong)} of 200 differ, e.g. {wrong[:3]} vs {expected}"
    worst = max(health_latency)
    print(f"\n200 concurrent streams x 16 tokens: {elapsed:.2f} s, {200 * 16 / elapsed:.0f} output tok/s; "
          f"/health answered {len(health_latency)} times meanwhile, slowest {worst * 1000:.0f} ms")
    assert len(health_latency) >= 3 and worst < 5.0
    wait_idle(http)


def test_disconnected_streams_free_their_kv_blocks(server: ServerProcess, http: httpx.Client):
    total = metrics(http)["qwen_serve_kv_blocks_total"]
    aborted_key = "qwen_serve_requests_finished_total{finished_reason=abort}"
    aborted_before = metrics(http).get(aborted_key, 0)
    body = {"model": MODEL, "prompt": "A long story: ", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    clients = [httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
               for _ in range(20)]
    streams = []
    try:
        for c in clients:
            cm = c.stream("POST", "/v1/completions", json=body)
            resp = cm.__enter__()
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:  # read until a few tokens arrived: the request is mid-generation
                if line.startswith("data: {"):
                    got += 1
                    if got == 2:
                        break
            streams.append((cm, lines))  # keep the line iterator alive: closing it closes the connection
        busy = metrics(http)
        assert busy["qwen_serve_num_requests_running"] + busy["qwen_serve_num_requests_waiting"] == 20
        assert busy["qwen_serve_kv_blocks_free"] < total
    finally:
        for (cm, _), c in zip(streams, clients):
            cm.__exit__(None, None, None)  # closes the connection mid-stream
            c.close()
    # A non-streaming client that gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json={**body, "stream": False}, timeout=1.5,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    after = wait_idle(http, timeout=30)
    assert after["qwen_serve_kv_blocks_free"] == total
    assert after[aborted_key] - aborted_before == 21
    # and the server still serves
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200


def test_bench_serve_cli(server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from qwen_serve.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, "--api-key", API_KEY, "--num-prompts", "12",
               "--request-rate", "20", "--arrival", "poisson", "--input-len", "8,24", "--output-len", "6",
               "--result-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["total_output_tokens"] == 12 * 6 and report["total_input_tokens"] == 6 * (8 + 24)
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"] <= report["e2e_ms"]["p99"]
    assert report["itl_ms"]["p50"] > 0 and report["output_throughput"] > 0
    assert "Output token throughput (tok/s):" in capsys.readouterr().out
