"""Cost of structured output: grammar compile and per-token mask time, and decode speed with and without a schema.

    python -m qwen_serve.structured.bench grammar [--engine llguidance|xgrammar]
    python -m qwen_serve.structured.bench step
    python -m qwen_serve.structured.bench decode [--output-len 64] [--batch 1]

`grammar` walks valid JSON instances of a few schemas token by token through the demo tokenizer
(151,936 ids), timing compile, first mask and each later mask. `--engine xgrammar` runs the same
workload through xgrammar, for the comparison in qwen_serve/structured/__init__.py; xgrammar is not a
dependency (install it in a side environment with `pip install --no-deps xgrammar apache-tvm-ffi`).
`step` times the constraint's share of one decode step at batch 1 (mask, apply to a [1, V] logits row,
accept), two ways: the preallocated int32 bitmask (`fill_bitmasks` + `apply_bitmask_`) and fresh bool rows
allocated every step (`torch.zeros` + `fill_mask` + `masked_fill_`).
`decode` generates with the demo model, greedy, unconstrained and under a JSON schema (alternating
rounds; the best round of each mode is the least disturbed by other processes), and reports decode tokens/s (wall time after the first token) and tokens per CPU-second of the
whole process (prompt included). On a shared machine the wall figure follows the neighbours' load; the
CPU-time figure counts only this process's work (the llguidance threads included), so it is the one to
compare between the modes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

_PROPS = {f"field_{i}": [{"type": "string"}, {"type": "integer", "minimum": 0},
                          {"type": "array", "items": {"type": "number"}}][i % 3] for i in range(40)}
CASES: dict[str, tuple[dict[str, Any] | None, Any]] = {
    "person": ({"type": "object", "properties": {"name": {"type": "string"},
                                                 "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                 "email": {"type": "string"}},
                "required": ["name", "age"], "additionalProperties": False},
               {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com"}),
    "order": ({"type": "object", "properties": {
                   "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                   "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                       "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                       "price": {"type": "number", "minimum": 0}, "kind": {"enum": ["book", "toy", "food"]}},
                       "required": ["sku", "qty", "price", "kind"]}},
                   "shipping": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                                "required": ["city"]}},
               "required": ["id", "items", "shipping"]},
              {"id": "ABC-1234", "items": [{"sku": "b-1", "qty": 2, "price": 9.5, "kind": "book"},
                                           {"sku": "t-9", "qty": 1, "price": 20, "kind": "toy"}],
               "shipping": {"city": "Paris", "zip": "75001"}}),
    "bounded_array": ({"type": "object", "properties": {"s": {"type": "string", "minLength": 5, "maxLength": 200},
                                                        "a": {"type": "array", "items": {"type": "integer"},
                                                              "minItems": 2, "maxItems": 30}},
                       "required": ["s", "a"]},
                      {"s": "hello world", "a": [1, 2, 3, 4, 5, 6]}),
    "recursive_tree": ({"$defs": {"node": {"type": "object", "properties": {
                            "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                            "required": ["v"]}}, "$ref": "#/$defs/node"},
                       {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}, {"v": 4}]}),
    "wide_40_props": ({"type": "object", "properties": _PROPS, "required": list(_PROPS)},
                      {k: {"string": "x", "integer": 3, "array": [1.5, 2]}[v["type"]] for k, v in _PROPS.items()}),
    "json_object": (None, {"answer": "yes", "n": [1, 2, {"x": None}]}),
}


def _us(seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"mean {1e6 * statistics.mean(s):.0f} us, p50 {1e6 * s[len(s) // 2]:.0f} us, max {1e6 * s[-1]:.0f} us"


def _walk(make: Callable[[], tuple[Callable[[], None], Callable[[int], bool], Callable[[int], bool]]],
          ids: list[int]) -> tuple[float, float, list[float]]:
    """make() -> (fill, allowed, accept), timed; returns compile s, first mask s, later mask times."""
    t0 = time.perf_counter()
    fill, allowed, accept = make()
    t1 = time.perf_counter()
    fill()
    t2 = time.perf_counter()
    times = []
    for n, token in enumerate(ids):
        if n:
            a = time.perf_counter()
            fill()
            times.append(time.perf_counter() - a)
        if not allowed(token) or not accept(token):
            raise RuntimeError(f"token {token} rejected at position {n}")
    return t1 - t0, t2 - t1, times


def bench_grammar(engine: str) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast

    from qwen_serve.loader.resolve import resolve_model
    from qwen_serve.tokenizer.tokenizer import Tokenizer

    folder = resolve_model("demo")
    tok = Tokenizer.from_folder(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    eos = tok.eos_token_ids
    bits = lambda mask: (lambda i: bool((int(mask[0, i // 32]) >> (i % 32)) & 1))  # noqa: E731
    if engine == "llguidance":
        import llguidance

        from qwen_serve.structured import GrammarCompiler, allocate_bitmask

        t = time.perf_counter()
        compiler = GrammarCompiler()
        compiler.precompile({"type": "lark", "grammar": 'start: "x"\n'}, tok, vocab).result()  # builds the tokenizer
        print(f"llguidance {llguidance.__version__}: tokenizer + first grammar {time.perf_counter() - t:.2f} s")
        mask = allocate_bitmask(1, vocab)

        def maker(schema):
            spec = {"type": "json_schema", "schema": schema} if schema else {"type": "json_object"}

            def make():
                c = compiler.precompile(spec, tok, vocab).result().new_constraint()
                return (lambda: c.fill_bitmask(mask)), bits(mask), c.accept
            return make
    else:
        import xgrammar as xgr

        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        t = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
        compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        print(f"xgrammar: tokenizer {time.perf_counter() - t:.2f} s")
        mask = xgr.allocate_token_bitmask(1, vocab)

        def maker(schema):
            def make():
                g = compiler.compile_json_schema(schema) if schema else compiler.compile_builtin_json_grammar()
                m = xgr.GrammarMatcher(g)
                return (lambda: m.fill_next_token_bitmask(mask)), bits(mask), m.accept_token
            return make
    torch.set_num_threads(1)
    for name, (schema, instance) in CASES.items():
        ids = tok.encode(json.dumps(instance)) + [eos[0]]
        compile_s, first_s, times = _walk(maker(schema), ids)
        print(f"  {name:15s} compile {1e3 * compile_s:7.1f} ms, first mask {1e3 * first_s:5.1f} ms, "
              f"mask per token ({len(ids)} tokens) {_us(times)}")


def bench_step() -> None:
    import torch

    from qwen_serve.loader.resolve import resolve_model
    from qwen_serve.structured import allocate_bitmask, apply_bitmask_, fill_bitmasks, new_constraint
    from qwen_serve.tokenizer.tokenizer import Tokenizer

    folder = resolve_model("demo")
    tok = Tokenizer.from_folder(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    schema, instance = CASES["order"]
    spec = {"type": "json_schema", "schema": schema}
    ids = tok.encode(json.dumps(instance))
    new_constraint(spec, tok, vocab)  # compile (and build the llguidance tokenizer) before timing

    def bitmask_path() -> None:
        c, bitmask, logits = new_constraint(spec, tok, vocab), allocate_bitmask(1, vocab), torch.randn(1, vocab)
        for token in ids:
            bitmask.fill_(-1)
            fill_bitmasks([(c, 0)], bitmask)
            apply_bitmask_(logits, bitmask)
            c.accept(token)

    def bool_rows_path() -> None:
        c, logits = new_constraint(spec, tok, vocab), torch.randn(1, vocab)
        for token in ids:
            allowed = torch.zeros(vocab, dtype=torch.bool)
            c.fill_mask(allowed)
            banned = torch.zeros(1, vocab, dtype=torch.bool)
            banned[0] = ~allowed
            logits.masked_fill_(banned, float("-inf"))
            c.accept(token)

    for _ in range(3):
        for path in (bitmask_path, bool_rows_path):
            t, cpu = time.perf_counter(), time.process_time()
            path()
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            print(f"{path.__name__:15s} per token: {1e3 * wall / len(ids):.2f} ms wall, "
                  f"{1e3 * cpu / len(ids):.2f} ms CPU ({len(ids)} tokens)")


def bench_decode(output_len: int, batch: int, rounds: int) -> None:
    from qwen_serve import LLM, SamplingParams

    llm = LLM("demo")
    schema = {"type": "object", "properties": {"people": {"type": "array", "minItems": 20, "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                         "city": {"type": "string"}}, "required": ["name", "age", "city"]}}},
              "required": ["people"]}
    messages = [{"role": "user", "content": "List twenty people as JSON with name, age and city."}]
    prompt = llm.get_tokenizer().apply_chat_template(messages)
    modes = {
        "unconstrained": dict(ignore_eos=True),
        "json_schema": dict(structured_output={"type": "json_schema", "schema": schema}),
    }
    best = {mode: 0.0 for mode in modes}
    for rnd in range(rounds):  # alternating, so both modes see the same machine load; the best round is the least disturbed
        for mode, extra in modes.items():
            params = SamplingParams(temperature=0.0, max_tokens=output_len, **extra)
            t, cpu = time.perf_counter(), time.process_time()
            outs = llm.generate([prompt] * batch, params, use_tqdm=False)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            m = [o.metrics for o in outs]
            tokens = sum(x.num_generation_tokens - 1 for x in m)
            decode_s = max(x.finished_time for x in m) - min(x.first_token_time for x in m)
            best[mode] = max(best[mode], tokens / decode_s)
            print(f"round {rnd} {mode:13s} batch {batch}: {sum(x.num_generation_tokens for x in m)} tokens, "
                  f"decode {tokens / decode_s:.2f} tok/s, wall {wall:.1f} s, "
                  f"{sum(x.num_generation_tokens for x in m) / cpu:.2f} tok per CPU-s, "
                  f"finish {[o.outputs[0].finish_reason for o in outs]}")
            if mode == "json_schema" and rnd == 0:
                print("   ", outs[0].outputs[0].text[:160].replace("\n", " "))
    print(f"best of {rounds}: unconstrained {best['unconstrained']:.2f} tok/s, json_schema {best['json_schema']:.2f} tok/s "
          f"({100 * best['json_schema'] / best['unconstrained']:.0f}%)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grammar", help="compile and per-token mask time")
    g.add_argument("--engine", choices=("llguidance", "xgrammar"), default="llguidance")
    sub.add_parser("step", help="the constraint's share of a decode step: bitmask vs per-step bool rows")
    d = sub.add_parser("decode", help="decode tokens/s with and without a JSON schema (demo model)")
    d.add_argument("--output-len", type=int, default=64)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.what == "grammar":
        bench_grammar(args.engine)
    elif args.what == "step":
        bench_step()
    else:
        bench_decode(args.output_len, args.batch, args.rounds)


if __name__ == "__main__":
    main()
