"""POST /v1/responses through the official openai SDK (`client.responses`), against a real server on the
tiny random model: each answer equals what the same conversation gets from /v1/chat/completions (greedy),
streamed events build the response a plain call returns (the SDK's own stream accumulator checks their
order and identities), previous_response_id continues a conversation until the store evicts it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from server_process import ServerProcess

STORED = 3
GREEDY = {"temperature": 0.0}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tiny_chat_checkpoint: Path, tmp_path_factory):
    proc = ServerProcess(tiny_chat_checkpoint, tmp_path_factory.mktemp("responses") / "server.log",
                         "--served-model-name", "tiny", "--generation-config", "vllm",
                         "--max-stored-responses", str(STORED))
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, **GREEDY, **kw)


def test_text_input_with_instructions_equals_chat(client):
    resp = client.responses.create(model="tiny", input="Name a fruit.", instructions="Be brief.",
                                   max_output_tokens=8, **GREEDY)
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
                 max_tokens=8)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.instructions == "Be brief."
    assert (resp.status, resp.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    assert [item.type for item in resp.output] == ["message"]


def test_stream_builds_the_same_response(client):
    kw = dict(model="tiny", input=[{"role": "user", "content": [{"type": "input_text", "text": "Count to three."}]}],
              max_output_tokens=10, **GREEDY)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    # The SDK's accumulator fails on a malformed sequence; its final response needs one that completes.
    kw["text"] = {"format": {"type": "json_schema", "name": "n", "schema": {"enum": ["one", "two", "three"]}}}
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert whole.status == "completed" and json.loads(whole.output_text) in ("one", "two", "three")
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens


def test_previous_response_continues_the_conversation(client):
    first = client.responses.create(model="tiny", input="Hello.", max_output_tokens=6, **GREEDY)
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=6, **GREEDY)
    chat = _chat(client, [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "And then?"}], max_tokens=6)
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_evicted_or_unstored_responses_are_refused_by_name(client):
    unstored = client.responses.create(model="tiny", input="x", max_output_tokens=1, store=False)
    oldest = client.responses.create(model="tiny", input="y", max_output_tokens=1)
    for _ in range(STORED):
        client.responses.create(model="tiny", input="z", max_output_tokens=1)
    for gone in (unstored.id, oldest.id):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="tiny", input="again", previous_response_id=gone, max_output_tokens=1)
        assert e.value.body["code"] == "previous_response_not_found" and gone in e.value.body["message"]
        assert "newest 3" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(oldest.id)


def test_function_call_then_its_output(client):
    resp = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                   max_output_tokens=60, **GREEDY)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments), dict)
    chat = _chat(client, [{"role": "user", "content": "Weather in Paris?"}], max_tokens=60, tool_choice="required",
                 tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}])
    assert calls[0].arguments == chat.choices[0].message.tool_calls[0].function.arguments
    follow = client.responses.create(model="tiny", previous_response_id=resp.id, tools=[WEATHER], max_output_tokens=4,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "Sunny, 21 C"}], **GREEDY)
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > resp.usage.input_tokens


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"fruit": {"type": "string", "enum": ["apple", "pear"]}},
              "required": ["fruit"], "additionalProperties": False}
    resp = client.responses.create(model="tiny", input="A fruit as JSON.", max_output_tokens=30, **GREEDY,
                                   text={"format": {"type": "json_schema", "name": "fruit", "schema": schema,
                                                    "strict": True}})
    assert json.loads(resp.output_text)["fruit"] in ("apple", "pear") and resp.status == "completed"


@pytest.mark.parametrize("body,match", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0: part type 'input_image' is not supported"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0: item type 'item_reference' is not supported"),
    ({"input": "x", "background": True}, "background: not supported"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice: needs tools"),
    ({"input": []}, "input: must not be empty"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, match):
    r = httpx.post(f"{server.base_url}/v1/responses", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
