"""Structured output with real llguidance and the demo tokenizer: masks allow exactly the schema's texts."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from qwen_serve.structured import (
    GrammarCompiler,
    StructuredOutputError,
    TokenConstraint,
    allocate_bitmask,
    apply_bitmask_,
    fill_bitmasks,
    new_constraint,
    precompile,
)
from qwen_serve.tokenizer.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "kind": {"enum": ["book", "toy", "food"]},
                },
                "required": ["sku", "qty", "kind"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["id", "items"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["v"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


def schema_spec(schema: dict) -> dict:
    return {"type": "json_schema", "schema": schema, "strict": True}


def first_rejected(c: TokenConstraint, ids: list[int], vocab: int) -> int | None:
    """Feed ids through the constraint, checking mask and accept agree; index of the first forbidden id."""
    allowed = torch.zeros(vocab, dtype=torch.bool)
    for n, token in enumerate(ids):
        c.fill_mask(allowed)
        if not allowed[token]:
            assert not c.accept(token)  # the matcher agrees with its mask
            return n
        assert c.accept(token), (n, token)
    return None


@pytest.mark.parametrize(
    "schema,valid,invalid",
    [
        (PERSON, [{"name": "Ada", "age": 36}, {"name": "Bob \"B\" Ray", "age": 0, "email": "b@x.org"}],
         [{"name": "Ada", "age": 200}, {"age": 3}, {"name": "Ada", "age": 3, "nick": "A"}, {"name": 5, "age": 3}]),
        (ORDER, [{"id": "ABC-1234", "items": [{"sku": "b-1", "qty": 2, "kind": "book"}], "express": True}],
         [{"id": "abc-1234", "items": [{"sku": "b", "qty": 2, "kind": "book"}]},
          {"id": "ABC-1234", "items": []},
          {"id": "ABC-1234", "items": [{"sku": "b", "qty": 0, "kind": "book"}]},
          {"id": "ABC-1234", "items": [{"sku": "b", "qty": 1, "kind": "car"}]}]),
        (TREE, [{"v": 1, "kids": [{"v": 2}, {"v": -3, "kids": []}]}], [{"v": 1, "kids": [{"v": "x"}]}, {"kids": []}]),
    ],
)
def test_json_schema_masks(tok, vocab, schema, valid, invalid):
    for instance in valid:
        jsonschema.validate(instance, schema)
        c = new_constraint(schema_spec(schema), tok, vocab)
        ids = tok.encode(json.dumps(instance))  # json.dumps writes ", " / ": " like the grammar
        assert first_rejected(c, ids, vocab) is None
        allowed = torch.zeros(vocab, dtype=torch.bool)
        c.fill_mask(allowed)
        assert c.is_finished()
        assert allowed.nonzero().flatten().tolist() == sorted(tok.eos_token_ids)  # only end-of-sequence left
        assert c.accept(tok.eos_token_ids[0])
    for instance in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(instance, schema)
        c = new_constraint(schema_spec(schema), tok, vocab)
        assert first_rejected(c, tok.encode(json.dumps(instance)), vocab) is not None, instance


def test_json_object_mode(tok, vocab):
    spec = {"type": "json_object"}
    for text in ['{"a": [1, 2.5, null], "b": {"c": "d"}}', "{}"]:
        c = new_constraint(spec, tok, vocab)
        assert first_rejected(c, tok.encode(text), vocab) is None
        assert c.is_finished()
    for text in ["[1, 2]", '"hi"', '{"a": 1}}', '{"a" 1}', "Sure! {"]:
        assert first_rejected(new_constraint(spec, tok, vocab), tok.encode(text), vocab) is not None, text
    # end of sequence is not allowed while the object is open
    c = new_constraint(spec, tok, vocab)
    for token in tok.encode('{"a": '):
        assert c.accept(token)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    c.fill_mask(allowed)
    assert not allowed[tok.eos_token_ids].any()
    assert not c.accept(tok.eos_token_ids[0]) and c.is_error()


_CLOSERS = ('"', "}", "]", ",", "0", "1", "true", "false", "null")


def random_walk(c: TokenConstraint, tok: Tokenizer, vocab: int, seed: int, limit: int = 600) -> str:
    """Sample like a model would, but at random among allowed ids; half the time prefer short closing tokens
    so that the walk ends. Returns the text; fails if the grammar ever dead-ends."""
    rng = random.Random(seed)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    out: list[int] = []
    for _ in range(limit):
        c.fill_mask(allowed)
        ids = allowed.nonzero().flatten().tolist()
        assert ids, "the mask allowed nothing"
        if any(i in tok.eos_token_ids for i in ids) and rng.random() < 0.5:
            return tok.decode(out)
        short = [i for i in ids if (tok.id_to_token(i) or "") in _CLOSERS]
        token = rng.choice(short if short and rng.random() < 0.5 else ids)
        if token in tok.eos_token_ids:
            return tok.decode(out)
        assert c.accept(token)
        out.append(token)
    raise AssertionError(f"no end after {limit} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("schema", [PERSON, ORDER, TREE], ids=["person", "order", "tree"])
def test_random_walk_is_schema_valid(tok, vocab, schema):
    for seed in range(3):
        text = random_walk(new_constraint(schema_spec(schema), tok, vocab), tok, vocab, seed)
        jsonschema.validate(json.loads(text), schema)


def test_unsupported_and_malformed_specs(tok, vocab):
    with pytest.raises(StructuredOutputError, match="uniqueItems"):
        new_constraint(schema_spec({"type": "array", "uniqueItems": True}), tok, vocab)
    with pytest.raises(StructuredOutputError, match="contains"):
        precompile(schema_spec({"type": "array", "contains": {"type": "integer"}}), tok, vocab).result()
    with pytest.raises(StructuredOutputError, match="one of"):
        new_constraint({"type": "xml"}, tok, vocab)
    with pytest.raises(StructuredOutputError, match="schema"):
        new_constraint({"type": "json_schema", "schema": "not a schema"}, tok, vocab)
    with pytest.raises(StructuredOutputError):
        new_constraint({"type": "lark", "grammar": "start: undefined_rule\n"}, tok, vocab)
    assert issubclass(StructuredOutputError, ValueError)


def test_openai_wrapper_and_lark(tok, vocab):
    spec = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    assert first_rejected(new_constraint(spec, tok, vocab), tok.encode('{"name": "A", "age": 1}'), vocab) is None
    lark = {"type": "lark", "grammar": 'start: ("yes" | "no") "!"\n'}
    assert first_rejected(new_constraint(lark, tok, vocab), tok.encode("no!"), vocab) is None
    assert first_rejected(new_constraint(lark, tok, vocab), tok.encode("maybe"), vocab) == 0


def test_regex_and_choice_specs(tok, vocab):
    """vLLM's guided_regex and guided_choice: the mask allows exactly the matching texts."""
    regex = {"type": "regex", "pattern": r"[A-Z]{2}-\d{3}"}
    assert first_rejected(new_constraint(regex, tok, vocab), tok.encode("AB-123"), vocab) is None
    assert first_rejected(new_constraint(regex, tok, vocab), tok.encode("ab-123"), vocab) == 0
    c = new_constraint(regex, tok, vocab)
    assert first_rejected(c, tok.encode("AB-123"), vocab) is None and c.is_finished()
    choice = {"type": "choice", "choices": ["red", "green", 'say "hi"', "北京"]}
    for text in ("green", 'say "hi"', "北京"):
        c = new_constraint(choice, tok, vocab)
        assert first_rejected(c, tok.encode(text), vocab) is None and c.is_finished(), text
    assert first_rejected(new_constraint(choice, tok, vocab), tok.encode("blue"), vocab) == 0
    for seed in range(3):
        assert random_walk(new_constraint(choice, tok, vocab), tok, vocab, seed) in choice["choices"]
    with pytest.raises(StructuredOutputError, match="regex"):
        new_constraint({"type": "regex", "pattern": "("}, tok, vocab)
    with pytest.raises(StructuredOutputError, match="choices"):
        new_constraint({"type": "choice", "choices": []}, tok, vocab)


def test_cache_is_keyed_by_canonical_spec_and_bounded(tok, vocab):
    compiler = GrammarCompiler(max_entries=2)
    a = compiler.precompile(schema_spec({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}), tok, vocab)
    b = compiler.precompile(schema_spec({"properties": {"y": {"type": "string"}, "x": {"type": "integer"}}, "type": "object"}), tok, vocab)
    assert a is b  # same schema, other key order: one compile
    assert compiler.precompile({"type": "json_schema", "json_schema": {"name": "n", "strict": False, "schema": {
        "type": "object", "properties": {"y": {"type": "string"}, "x": {"type": "integer"}}}}}, tok, vocab) is a
    assert a.result().vocab_size == vocab
    compiler.precompile({"type": "json_object"}, tok, vocab)
    compiler.precompile({"type": "lark", "grammar": 'start: "a"\n'}, tok, vocab)
    assert compiler.cache_size() == 2
    assert compiler.precompile(schema_spec({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}), tok, vocab) is not a
    # constraints from one compiled grammar are independent
    first, second = a.result().new_constraint(), a.result().new_constraint()
    assert first.accept(tok.encode("{")[0])
    assert first_rejected(second, tok.encode('{"x": 1}'), vocab) is None


def test_mask_covers_logits_wider_than_tokenizer(tok):
    wide = tok.vocab_size + 128
    c = new_constraint({"type": "json_object"}, tok, wide)
    allowed = torch.ones(wide + 64, dtype=torch.bool)  # longer rows are fine: the tail is cleared
    c.fill_mask(allowed)
    assert not allowed[tok.vocab_size:].any()
    assert allowed.sum() > 0
    with pytest.raises(ValueError):
        c.fill_mask(torch.zeros(tok.vocab_size, dtype=torch.bool))
    with pytest.raises(ValueError):
        new_constraint({"type": "json_object"}, tok, tok.vocab_size - 1)


def test_batched_bitmask_matches_bool_masks(tok, vocab):
    spec = schema_spec(PERSON)
    constraints = [new_constraint(spec, tok, vocab) for _ in range(3)]
    for token in tok.encode('{"name": "A'):
        assert constraints[1].accept(token)
    for token in tok.encode('{"name": "A", "age": 1'):
        assert constraints[2].accept(token)
    bitmask = allocate_bitmask(4, vocab)  # row 0 stays unconstrained
    fill_bitmasks([(constraints[0], 1), (constraints[1], 2), (constraints[2], 3)], bitmask)
    logits = torch.randn(4, vocab)
    reference = logits.clone()
    apply_bitmask_(logits, bitmask)
    assert torch.equal(logits[0], reference[0])
    allowed = torch.zeros(vocab, dtype=torch.bool)
    for row, c in enumerate(constraints, start=1):
        c.fill_mask(allowed)
        assert torch.equal(torch.isfinite(logits[row]), allowed)
        assert torch.equal(logits[row][allowed], reference[row][allowed])
        single = allocate_bitmask(1, vocab)
        c.fill_bitmask(single)
        assert torch.equal(single[0], bitmask[row])
    with pytest.raises(ValueError):
        constraints[0].fill_bitmask(allocate_bitmask(1, vocab + 64))
    # bf16 logits take the torch path (the one used on GPUs): same mask as the numpy path
    half = reference.to(torch.bfloat16)
    apply_bitmask_(half, bitmask)
    assert torch.equal(torch.isfinite(half), torch.isfinite(logits))


BOUNDED = [  # every text these allow is short, so even a random-weight model must finish them
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "bird"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["kind", "n"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                                      "where": {"type": "object", "properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"], "additionalProperties": False}},
     "required": ["ok", "tags", "where"], "additionalProperties": False},
]


def test_engine_output_is_schema_valid(tiny_chat_checkpoint):
    """Through the offline API with a random-weight model: the grammar alone makes the output valid."""
    from qwen_serve import LLM, SamplingParams

    llm = LLM(model=str(tiny_chat_checkpoint), dtype="float32", device="cpu", num_kv_blocks=128, max_model_len=512)
    for schema in BOUNDED:
        spec = {"type": "json_schema", "schema": schema}
        for params in (SamplingParams(temperature=0.0, max_tokens=64, structured_output=spec),
                       SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=64, structured_output=spec)):
            for out in llm.generate(["Answer in JSON:"], params, use_tqdm=False)[0].outputs:
                assert out.finish_reason == "stop", out.text
                jsonschema.validate(json.loads(out.text), schema)
    # max_tokens ends an unfinished object: "length", and the text is a prefix the grammar allowed
    spec = {"type": "json_schema", "schema": BOUNDED[2]}
    out = llm.generate(["Answer in JSON:"], SamplingParams(temperature=0.0, max_tokens=3, structured_output=spec),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.text.startswith('{"ok":')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


# 20 schemas of varied shapes, each with the request a user would send with it.
TWENTY = [
    ("a user profile", {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "email": {"type": "string"}}, "required": ["name", "age"]}),
    ("a book", {"type": "object", "properties": {"title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}, "genres": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}, "required": ["title", "author", "year", "genres"]}),
    ("a traffic light state", {"type": "object", "properties": {"color": {"enum": ["red", "yellow", "green"]}, "seconds_left": {"type": "integer", "minimum": 0, "maximum": 90}}, "required": ["color", "seconds_left"]}),
    ("a point in 3D", {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}, "z": {"type": "number"}}, "required": ["x", "y", "z"], "additionalProperties": False}),
    ("three primary colors", {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}),
    ("an order with line items", {"type": "object", "properties": {"order_id": {"type": "string"}, "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 10}, "price": {"type": "number", "minimum": 0}}, "required": ["sku", "qty", "price"]}}}, "required": ["order_id", "items"]}),
    ("a temperature reading", {"type": "object", "properties": {"celsius": {"type": "number", "minimum": -90, "maximum": 60}, "city": {"type": "string"}}, "required": ["celsius", "city"]}),
    ("whether Paris is in France", {"type": "object", "properties": {"answer": {"type": "boolean"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["answer", "confidence"]}),
    ("a company with an address", {"type": "object", "properties": {"name": {"type": "string"}, "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"]}}, "required": ["name", "address"]}),
    ("a to-do list", {"type": "object", "properties": {"todos": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {"task": {"type": "string"}, "done": {"type": "boolean"}, "priority": {"enum": ["low", "medium", "high"]}}, "required": ["task", "done", "priority"], "additionalProperties": False}}}, "required": ["todos"]}),
    ("a date", {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100}, "month": {"type": "integer", "minimum": 1, "maximum": 12}, "day": {"type": "integer", "minimum": 1, "maximum": 31}}, "required": ["year", "month", "day"]}),
    ("a product rating", {"type": "object", "properties": {"product": {"type": "string"}, "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "pros": {"type": "array", "items": {"type": "string"}, "maxItems": 3}, "cons": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}, "required": ["product", "stars", "pros", "cons"]}),
    ("an HTTP response", {"type": "object", "properties": {"status": {"enum": [200, 201, 400, 404, 500]}, "headers": {"type": "object", "additionalProperties": {"type": "string"}}, "body": {"type": ["string", "null"]}}, "required": ["status", "headers", "body"]}),
    ("a matrix of 2 rows of 2 integers", {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer"}}}),
    ("a geometric shape", {"type": "object", "properties": {"shape": {"oneOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "exclusiveMinimum": 0}}, "required": ["kind", "radius"]}, {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number", "exclusiveMinimum": 0}}, "required": ["kind", "side"]}]}}, "required": ["shape"]}),
    ("a recipe", {"type": "object", "properties": {"dish": {"type": "string"}, "servings": {"type": "integer", "minimum": 1, "maximum": 12}, "ingredients": {"type": "array", "minItems": 2, "maxItems": 5, "items": {"type": "object", "properties": {"name": {"type": "string"}, "grams": {"type": "number", "minimum": 0}}, "required": ["name", "grams"]}}}, "required": ["dish", "servings", "ingredients"]}),
    ("a chess move", {"type": "object", "properties": {"from": {"type": "string", "pattern": "^[a-h][1-8]$"}, "to": {"type": "string", "pattern": "^[a-h][1-8]$"}, "piece": {"enum": ["pawn", "knight", "bishop", "rook", "queen", "king"]}}, "required": ["from", "to", "piece"]}),
    ("a team with members", {"$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}, "role": {"enum": ["dev", "pm", "design"]}}, "required": ["name", "role"]}}, "type": "object", "properties": {"team": {"type": "string"}, "lead": {"$ref": "#/$defs/person"}, "members": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 3}}, "required": ["team", "lead", "members"]}),
    ("the sum of 2 and 3", {"type": "object", "properties": {"expression": {"type": "string"}, "result": {"type": "integer"}}, "required": ["expression", "result"]}),
    ("a weather forecast for 3 days", {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "object", "properties": {"day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "high": {"type": "integer", "minimum": -50, "maximum": 60}, "low": {"type": "integer", "minimum": -60, "maximum": 50}}, "required": ["day", "high", "low"]}}}, "required": ["city", "days"]}),
]


@pytest.mark.demo
@pytest.mark.slow
def test_demo_model_twenty_schemas_greedy_and_sampled(demo_folder):
    """The demo model under each schema, greedy and sampled: every answer is valid; json_object always parses."""
    from qwen_serve import LLM, SamplingParams

    llm = LLM(model=str(demo_folder), kv_cache_gb=0.5, max_model_len=2048)
    tok = llm.get_tokenizer()
    prompts, params, schemas = [], [], []
    for n, (what, schema) in enumerate(TWENTY):
        jsonschema.Draft202012Validator.check_schema(schema)
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Give {what} as JSON following this schema: {json.dumps(schema)}"}])
        spec = {"type": "json_schema", "schema": schema}
        for p in (SamplingParams(temperature=0.0, max_tokens=200, structured_output=spec),
                  SamplingParams(temperature=0.8, top_p=0.95, seed=n, max_tokens=200, structured_output=spec)):
            prompts.append(prompt)
            params.append(p)
            schemas.append(schema)
    for what in ("a city", "your favourite numbers"):
        prompts.append(tok.apply_chat_template([{"role": "user", "content": f"Describe {what} as a JSON object."}]))
        params.append(SamplingParams(temperature=0.7, seed=1, max_tokens=200, structured_output={"type": "json_object"}))
        schemas.append({"type": "object"})
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, schema in zip(outs, schemas):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
