"""Qwen <tool_call> parsing (whole and streamed) and the tool_choice grammars with real llguidance."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch

from qwen_serve.server.tool_calls import (
    ContentDelta,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    parse_tool_calls,
    tool_choice_spec,
)
from qwen_serve.structured import new_constraint
from qwen_serve.tokenizer.tokenizer import Tokenizer

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
    "additionalProperties": False,
}
CALC = {
    "type": "object",
    "properties": {"expression": {"type": "string"}, "precision": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["expression"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic", "parameters": CALC}},
]


def block(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


TWO_CALLS = block("get_weather", {"city": "Paris", "unit": "celsius"}) + "\n" + block("calculator", {"expression": "2*(3+4)"})

CASES = [
    "Just text, no tools. 1 < 2 and <b>bold</b>.",
    block("get_weather", {"city": "Paris"}),
    TWO_CALLS,
    "Let me check both.\n" + TWO_CALLS + "\nDone.",
    block("get_weather", {"city": "Zürich \"Z\" {x}", "unit": "celsius"}),
    '<tool_call>\n{"arguments": {"expression": "1+1"}, "name": "calculator"}\n</tool_call>',  # name last
    "See: <tool_call>\nnot json at all\n</tool_call> and after",  # malformed: stays content
    "text " + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
    "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"}}\"}}\n  \n</tool_call>",
    "Ends with a partial tag <tool_c",
    "<tool_call>\nnot a call, cut inside the closing tag </tool_",
    "",
]


def test_single_and_several_calls():
    msg = parse_tool_calls("Let me check both.\n" + TWO_CALLS + "\n", ids())
    assert msg.content == "Let me check both."
    assert msg.tool_calls == [
        ToolCall("call_0", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
        ToolCall("call_1", "calculator", '{"expression": "2*(3+4)"}'),
    ]
    assert msg.tool_calls[0].to_openai() == {
        "id": "call_0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    assert parse_tool_calls(TWO_CALLS, ids()).content is None
    assert parse_tool_calls("plain", ids()) == ParsedMessage("plain", [])
    assert parse_tool_calls("", ids()) == ParsedMessage("", [])


def test_random_ids():
    first, second = parse_tool_calls(TWO_CALLS).tool_calls
    assert first.id.startswith("call_") and len(first.id) > 10 and first.id != second.id


def test_other_block_shapes():
    name_last = parse_tool_calls(CASES[5], ids())
    assert name_last.tool_calls == [ToolCall("call_0", "calculator", '{"expression": "1+1"}')]
    bad = parse_tool_calls(CASES[6], ids())
    assert bad.tool_calls == [] and bad.content == CASES[6]
    cut = parse_tool_calls(CASES[7], ids())
    assert cut.content == "text" and cut.tool_calls == [ToolCall("call_0", "get_weather", '{"city": "Par')]
    braces = parse_tool_calls(CASES[8], ids())
    assert json.loads(braces.tool_calls[0].arguments) == {"expression": "}}"}
    assert parse_tool_calls(CASES[9], ids()).content == CASES[9]
    assert parse_tool_calls(CASES[10], ids()).content == CASES[10]


def stream(text: str, cuts: list[int], names=None) -> tuple[list, ParsedMessage]:
    parser = ToolCallParser(ids(), names)
    events = []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return events, parser.result()


def replay(events: list) -> ParsedMessage:
    """What an OpenAI client reconstructs from the deltas."""
    content, calls = "", {}
    for e in events:
        delta = e.to_openai()
        content += delta.get("content", "")
        for c in delta.get("tool_calls", []):
            if "id" in c:
                assert c["index"] not in calls and c["type"] == "function"
                calls[c["index"]] = [c["id"], c["function"]["name"], c["function"]["arguments"]]
            else:
                calls[c["index"]][2] += c["function"]["arguments"]
    tool_calls = [ToolCall(*calls[i]) for i in sorted(calls)]
    return ParsedMessage(None if tool_calls and not content else content, tool_calls)


BARE = [
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',
    ' [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "calculator", "arguments": {"expression": "1"}}]\n',
    '{"name": "get_weather", "arguments": {"city": "Oslo"}} and more text',
    '```python\nprint("<tool_call>")\n```',
]
NAMES = ("get_weather", "calculator")


def test_bare_json_calls():
    fenced = parse_tool_calls(BARE[0], ids(), NAMES)
    assert fenced == ParsedMessage(None, [ToolCall("call_0", "get_weather", '{"city": "Paris"}')])
    assert [c.name for c in parse_tool_calls(BARE[1], ids(), NAMES).tool_calls] == ["get_weather", "calculator"]
    assert parse_tool_calls(BARE[0], ids()).content == BARE[0]  # only with the declared names
    assert parse_tool_calls(BARE[0], ids(), ["calculator"]).content == BARE[0]  # undeclared name: text
    assert parse_tool_calls(BARE[2], ids(), NAMES).content == BARE[2]  # more than the call: text
    other_keys = '{"name": "get_weather", "arguments": {}, "note": 1}'
    assert parse_tool_calls(other_keys, ids(), NAMES).content == other_keys
    parser = ToolCallParser(ids(), NAMES)
    assert parser.feed("``") == [] and parser.feed("`py") == [ContentDelta("```py")]  # not JSON: streams at once


@pytest.mark.parametrize("names", [None, NAMES], ids=["tags-only", "bare-too"])
@pytest.mark.parametrize("text", CASES + BARE)
def test_streaming_equals_whole_parse(text, names):
    whole = parse_tool_calls(text, ids(), names)
    rng = random.Random(len(text))
    splits = [[], list(range(1, len(text)))]  # one chunk; one character at a time
    splits += [sorted(rng.sample(range(1, len(text)), rng.randint(1, min(8, len(text) - 1)))) for _ in range(30) if len(text) > 2]
    for cuts in splits:
        events, result = stream(text, cuts, names)
        assert result == whole, cuts
        assert replay(events) == whole, cuts
        for e in events:
            if isinstance(e, ContentDelta) and whole.tool_calls:
                assert "<tool_call>" not in e.text and not e.text.isspace()


def test_streamed_deltas_name_first_and_tags_held_back():
    parser = ToolCallParser(ids())
    assert parser.feed("Checking <tool") == [ContentDelta("Checking")]  # " <tool" might open a block
    assert parser.feed("_call>\n{\"name\": \"get_wea") == []
    assert parser.feed('ther", "arguments": {"ci') == [
        ToolCallDelta(0, "", "call_0", "get_weather"), ToolCallDelta(0, '{"ci')]
    assert parser.feed('ty": "Oslo"') == [ToolCallDelta(0, 'ty": "Oslo"')]
    assert parser.feed("}") == []  # this "}" may close the outer object, not the arguments: held
    assert parser.feed("}") == [ToolCallDelta(0, "}")]
    assert parser.feed("\n</tool_call>") == []
    assert parser.feed("\n") == []
    assert parser.finish() == []
    assert parser.result() == ParsedMessage("Checking", [ToolCall("call_0", "get_weather", '{"city": "Oslo"}')])
    assert ToolCallDelta(0, "", "call_0", "get_weather").to_openai() == {"tool_calls": [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}
    assert ToolCallDelta(1, "x").to_openai() == {"tool_calls": [{"index": 1, "function": {"arguments": "x"}}]}


def test_tool_choice_spec_shapes():
    assert tool_choice_spec(TOOLS, "auto") is None
    assert tool_choice_spec(TOOLS, "none") is None
    assert tool_choice_spec(None, None) is None
    assert tool_choice_spec(TOOLS, "required")["type"] == "lark"
    with pytest.raises(ValueError, match="not in 'tools'"):
        tool_choice_spec(TOOLS, {"type": "function", "function": {"name": "send_email"}})
    with pytest.raises(ValueError, match="at least one tool"):
        tool_choice_spec([], "required")
    with pytest.raises(ValueError, match="tool_choice"):
        tool_choice_spec(TOOLS, "always")
    with pytest.raises(ValueError, match="repeats the function name"):
        tool_choice_spec(TOOLS + TOOLS[:1], "required")


# -- grammars, with llguidance and the demo tokenizer ------------------------------------------------
def accepts(spec: dict, text: str, tok: Tokenizer, vocab: int) -> bool:
    c = new_constraint(spec, tok, vocab)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    for token in tok.encode(text):
        c.fill_mask(allowed)
        if not allowed[token]:
            return False
        assert c.accept(token)
    c.fill_mask(allowed)
    return bool(allowed[tok.eos_token_ids].all())  # complete: the answer may end here


def test_required_grammar(tok, vocab):
    spec = tool_choice_spec(TOOLS, "required")
    assert tok.encode("<tool_call>")[0] == tok.token_to_id("<tool_call>")  # the tag is one token, as the model writes it
    assert accepts(spec, block("get_weather", {"city": "Paris"}), tok, vocab)
    assert accepts(spec, TWO_CALLS, tok, vocab)
    assert accepts(spec, TWO_CALLS + "\n", tok, vocab)  # a turn may end with a newline
    assert not accepts(spec, "Sure! " + block("get_weather", {"city": "Paris"}), tok, vocab)  # a call must come first
    assert not accepts(spec, block("send_email", {"to": "x"}), tok, vocab)  # undeclared tool
    assert not accepts(spec, block("get_weather", {"unit": "celsius"}), tok, vocab)  # missing required "city"
    assert not accepts(spec, block("calculator", {"expression": "1", "precision": 11}), tok, vocab)  # above maximum
    assert not accepts(spec, "", tok, vocab)  # at least one call
    single = tool_choice_spec(TOOLS, "required", parallel_tool_calls=False)
    assert accepts(single, block("calculator", {"expression": "1"}), tok, vocab)
    assert not accepts(single, TWO_CALLS, tok, vocab)


def test_tool_arguments_are_closed_objects(tok, vocab):
    open_schema = {"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
    free = {"type": "object", "properties": {"q": {"type": "string"}}, "additionalProperties": True}
    tools = [{"type": "function", "function": {"name": "search", "parameters": open_schema}},
             {"type": "function", "function": {"name": "free", "parameters": free}}]
    spec = tool_choice_spec(tools, "required")
    assert accepts(spec, block("search", {"q": "x", "opts": {"n": 1}}), tok, vocab)
    assert not accepts(spec, block("search", {"q": "x", "type": "string"}), tok, vocab)
    assert not accepts(spec, block("search", {"opts": {"n": 1, "m": 2}}), tok, vocab)
    assert accepts(spec, block("free", {"q": "x", "extra": [1]}), tok, vocab)  # the schema asked for extras
    assert open_schema == {"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object", "properties": {"n": {"type": "integer"}}}}}


def test_tool_schemas_with_definitions_and_references(tok, vocab):
    """The parameters pydantic writes for nested models (what instructor's TOOLS mode sends): references into
    "$defs" resolve under tool_choice "required" and a named function."""
    from pydantic import BaseModel

    class Address(BaseModel):
        city: str
        zip_code: str

    class Person(BaseModel):
        name: str
        home: Address
        previous: list[Address] = []

    params = Person.model_json_schema()
    assert "$defs" in params and params["properties"]["home"]["$ref"] == "#/$defs/Address"
    tools = [{"type": "function", "function": {"name": "Person", "description": "Correctly extracted `Person`",
                                               "parameters": params}}]
    call = {"name": "Ada", "home": {"city": "London", "zip_code": "N1"}, "previous": []}
    for choice in ("required", {"type": "function", "function": {"name": "Person"}}):
        spec = tool_choice_spec(tools, choice)
        assert accepts(spec, block("Person", call), tok, vocab)
        assert not accepts(spec, block("Person", {"name": "Ada", "home": {"city": "London"}}), tok, vocab)
    assert "$defs" in params  # the caller's schema is not changed


def test_named_function_grammar(tok, vocab):
    spec = tool_choice_spec(TOOLS, {"type": "function", "function": {"name": "calculator"}})
    assert accepts(spec, block("calculator", {"expression": "6*7", "precision": 2}), tok, vocab)
    assert not accepts(spec, block("get_weather", {"city": "Paris"}), tok, vocab)
    assert not accepts(spec, block("calculator", {"expression": "1"}) + "\n" + block("calculator", {"expression": "2"}), tok, vocab)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_constrained_random_output_parses_to_valid_calls(tok, vocab, choice):
    """Whatever a sampler picks under the grammar, the parser returns calls whose arguments fit the schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    closers = {'"', "}", "]", ",", "0", "1", "</tool_call>"}
    for seed in range(3):
        rng = random.Random(seed)
        c = new_constraint(tool_choice_spec(TOOLS, choice), tok, vocab)
        allowed = torch.zeros(vocab, dtype=torch.bool)
        out: list[int] = []
        for _ in range(400):
            c.fill_mask(allowed)
            choices = allowed.nonzero().flatten().tolist()
            if allowed[tok.eos_token_ids[0]]:
                break
            short = [i for i in choices if tok.id_to_token(i) in closers]
            token = rng.choice(short if short and rng.random() < 0.6 else choices)
            assert c.accept(token)
            out.append(token)
        else:
            raise AssertionError("no end")
        msg = parse_tool_calls(tok.decode(out), ids())
        assert msg.content is None and msg.tool_calls
        for call in msg.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            if isinstance(choice, dict):
                assert call.name == "get_weather"


FORECAST = {  # bounded arguments, so a random-weight model finishes the call
    "type": "object",
    "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["unit", "days"],
    "additionalProperties": False,
}
FORECAST_TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": FORECAST}},
                  {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}]


def test_engine_tool_choice_output_parses(tiny_chat_checkpoint):
    """Through the offline API with a random-weight model: forced calls parse, streamed or whole, and validate."""
    from qwen_serve import LLM, SamplingParams
    from qwen_serve.tokenizer.detokenizer import IncrementalDetokenizer

    llm = LLM(model=str(tiny_chat_checkpoint), dtype="float32", device="cpu", num_kv_blocks=128, max_model_len=512)
    prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Weather for the week?"}], tools=FORECAST_TOOLS)
    for choice in ("required", {"type": "function", "function": {"name": "forecast"}}):
        spec = tool_choice_spec(FORECAST_TOOLS, choice)
        params = SamplingParams(temperature=1.0, seed=11, n=3, max_tokens=80, structured_output=spec)
        for out in llm.generate([prompt], params, use_tqdm=False)[0].outputs:
            assert out.finish_reason == "stop", out.text
            whole = parse_tool_calls(out.text, ids())
            assert whole.content is None and whole.tool_calls
            for call in whole.tool_calls:
                jsonschema.validate(json.loads(call.arguments), FORECAST if call.name == "forecast" else {"maxProperties": 0})
                assert isinstance(choice, str) or call.name == "forecast"
            parser, detok = ToolCallParser(ids()), IncrementalDetokenizer(llm.get_tokenizer())
            for token in out.token_ids:  # token by token, as the server streams it
                parser.feed(detok.add([token]))
            parser.feed(detok.flush())
            parser.finish()
            assert parser.result() == whole


# -- through the HTTP server, with the official SDK ------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    import openai
    from server_process import ServerProcess

    proc = ServerProcess(tiny_chat_checkpoint, tmp_path_factory.mktemp("server") / "server.log",
                         "--served-model-name", "tiny", "--num-kv-blocks", "1024")
    yield openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert proc.stop() == 0, proc.output()[-3000:]


ASK = [{"role": "user", "content": "What's the forecast for the next days, in celsius?"}]


def chat(client, stream: bool, **kw) -> tuple[str | None, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) of the first choice, as an SDK user assembles it."""
    if not stream:
        choice = client.chat.completions.create(model="tiny", messages=ASK, **kw).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls or [])
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert "<tool_call>" not in (delta.content or "")
        content += delta.content or ""
        for c in delta.tool_calls or []:
            if c.id is not None:  # the first delta of a call: id and name, before any argument text
                assert c.index not in calls and c.function.name
                calls[c.index] = [c.function.name, ""]
            calls[c.index][1] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "forecast"}}, "auto", "none"],
                         ids=["required", "named", "auto", "none"])
def test_server_tool_choice_streamed_equals_whole(client, choice):
    kw = dict(tools=FORECAST_TOOLS, tool_choice=choice, temperature=0.0, max_tokens=60, parallel_tool_calls=False)
    whole = chat(client, False, **kw)
    assert chat(client, True, **kw) == whole
    content, calls, finish = whole
    if choice in ("required", "auto") or isinstance(choice, dict):
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), FORECAST if name == "forecast" else {"maxProperties": 0})
    if choice == "required" or isinstance(choice, dict):
        assert finish == "tool_calls" and content is None and len(calls) == 1
        assert isinstance(choice, str) or calls[0][0] == "forecast"
    if choice == "none":
        assert calls == [] and finish in ("stop", "length")


def test_server_json_schema_and_errors(client):
    import openai

    schema = BOUNDED_SCHEMA
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=5, n=2)):
        r = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=60, **kw)
        for c in r.choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), schema)
    assert chat(client, True, response_format=fmt, temperature=0.0, max_tokens=60) == \
        chat(client, False, response_format=fmt, temperature=0.0, max_tokens=60)
    bad = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, response_format=bad, max_tokens=5)
    assert "uniqueItems" in e.value.body["message"] and e.value.body["param"] == "response_format"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "contains": {}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=tools, tool_choice="required", max_tokens=5)
    assert "contains" in e.value.body["message"] and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=FORECAST_TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_server_vllm_guided_fields(client):
    """vLLM's guided_choice / guided_regex / guided_json and structured_outputs, on chat and completions
    (where response_format works too); conflicting or unsupported fields are 400s naming the field."""
    import re

    import openai

    colors = ["red", "green", "light blue"]
    r = client.completions.create(model="tiny", prompt="Pick a color:", max_tokens=20, n=3, temperature=1.0, seed=2,
                                  extra_body={"guided_choice": colors})
    assert all(c.text in colors and c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=1.0, seed=3,
                                       extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{2,3}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{2,3}", r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="A pet:", max_tokens=60, temperature=0.0,
                                  extra_body={"guided_json": json.dumps(BOUNDED_SCHEMA)})
    jsonschema.validate(json.loads(r.choices[0].text), BOUNDED_SCHEMA)
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": BOUNDED_SCHEMA}}
    r = client.completions.create(model="tiny", prompt="A pet:", max_tokens=60, temperature=1.0, seed=4,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), BOUNDED_SCHEMA)
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    for extra, param in ((dict(guided_choice=["a"], guided_regex="b"), "guided_choice"),
                         (dict(guided_grammar='root ::= "a"'), "guided_grammar"),
                         (dict(guided_regex="("), "guided_regex"),
                         (dict(guided_json="{not json"), "guided_json"),
                         (dict(guided_choice=[]), "guided_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body=extra)
        assert e.value.body["param"] == param, (extra, e.value.body)


BOUNDED_SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 20}},
                  "required": ["kind", "age"], "additionalProperties": False}


WEATHER_CALC = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression",
                                      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                     "required": ["expression"]}}},
]


@pytest.mark.demo
@pytest.mark.slow
def test_demo_model_weather_and_calculator(demo_folder):
    """The demo model with two tools under each tool_choice; streamed parsing equals the whole parse."""
    from qwen_serve import LLM, SamplingParams
    from qwen_serve.tokenizer.detokenizer import IncrementalDetokenizer

    llm = LLM(model=str(demo_folder), kv_cache_gb=0.5, max_model_len=4096)
    tok = llm.get_tokenizer()
    names = [t["function"]["name"] for t in WEATHER_CALC]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_CALC}
    ask = [{"role": "user", "content": "What's the weather in Paris right now?"}]
    choices = ["auto", "required", {"type": "function", "function": {"name": "calculator"}}, "none"]
    prompts = [tok.apply_chat_template(ask, tools=None if c == "none" else WEATHER_CALC) for c in choices]
    params = [SamplingParams(temperature=0.0, max_tokens=120, structured_output=tool_choice_spec(WEATHER_CALC, c, False))
              for c in choices]
    for choice, out in zip(choices, llm.generate(prompts, params, use_tqdm=False)):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (choice, o.text)
        whole = parse_tool_calls(o.text, ids(), None if choice == "none" else names)
        parser, detok = ToolCallParser(ids(), None if choice == "none" else names), IncrementalDetokenizer(tok)
        for token in o.token_ids:
            parser.feed(detok.add([token]))
        parser.feed(detok.flush())
        parser.finish()
        assert parser.result() == whole
        for call in whole.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        if choice == "none":
            assert whole.tool_calls == [] and whole.content
        elif choice == "auto":  # the model asks for the weather: as a <tool_call> block or a bare JSON call
            assert [c.name for c in whole.tool_calls] == ["get_weather"]
            assert "paris" in json.loads(whole.tool_calls[0].arguments)["city"].lower()
        else:
            assert len(whole.tool_calls) == 1 and whole.content is None
            assert isinstance(choice, str) or whole.tool_calls[0].name == "calculator"
