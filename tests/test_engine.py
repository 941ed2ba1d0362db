"""LLMEngine end to end on tiny random-weight models, against transformers and plain reference loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm import LLM
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import RequestOutputKind, SamplingParams

from conftest import make_tiny_checkpoint

VOCAB = 320
NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny checkpoint with weights scaled up: its greedy choices have clear margins (float noise
    cannot swap them) and its outputs vary instead of repeating one token."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "m", vocab=VOCAB, max_pos=512)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors = {name: t * 8 if t.dim() == 2 else t for name, t in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


class CharTokenizer:
    """A stand-in tokenizer: token i decodes to one or two letters, so text spans tokens."""

    def __init__(self, eos: list[int] | None = None) -> None:
        self.eos_token_ids = eos or []

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) * (1 + i % 2) for i in ids)

    def encode(self, text, add_special_tokens=False):
        raise NotImplementedError


def _engine(folder, tokenizer=None, **overrides) -> LLMEngine:
    cfg = dict(model=str(folder), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_model_len=128)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), Path(folder), tokenizer=tokenizer)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(0, VOCAB, (13,), generator=gen).tolist()
    out = []
    for i, n in enumerate([1, 3, 5, 8, 13, 21, 34, 40, 2, 9, 17, 27, 6, 11, 30, 15]):
        tail = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        out.append(shared + tail if i % 4 == 0 else tail)  # a quarter share a 13-token prefix
    return out


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": NEW, "ignore_eos": True, **kw})


def _generate(engine: LLMEngine, prompts, params) -> list:
    return LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def expected(reference) -> list[list[int]]:
    out = []
    for p in _prompts():
        with torch.no_grad():
            ids = reference.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("overrides", [
    {},
    {"enable_prefix_caching": False},
    {"max_num_batched_tokens": 7},
    {"num_kv_blocks": 20, "max_model_len": 64},
], ids=["prefix-cache", "no-prefix-cache", "chunked-prefill", "preemption"])
def test_greedy_batch_matches_transformers(tiny, expected, overrides):
    engine = _engine(tiny, **overrides)
    outs = _generate(engine, _prompts(), _greedy())
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    stats = engine.stats()
    if "num_kv_blocks" in overrides:
        assert stats.num_preemptions > 0
    if not overrides:
        assert stats.prefix_cache_hits > 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_each_alone_equals_together(tiny, expected):
    engine = _engine(tiny)
    for p, exp in zip(_prompts(), expected):
        assert _generate(engine, [p], _greedy())[0].outputs[0].token_ids == exp


def test_seeded_sampling_ignores_batch_companions(tiny):
    engine = _engine(tiny)
    prompt = _prompts()[5]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = _generate(engine, [prompt], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, top_k=5, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.2, top_p=0.7, max_tokens=3, ignore_eos=True), _greedy()]
    mixed = _generate(engine, _prompts()[:3] + [prompt] + _prompts()[6:8], others + [seeded] + others[:2])
    assert mixed[3].outputs[0].token_ids == alone
    reseeded = _generate(engine, [prompt], SamplingParams(temperature=1.0, seed=1235, max_tokens=12, ignore_eos=True))
    assert reseeded[0].outputs[0].token_ids != alone


def test_n_samples_share_prompt_and_follow_their_seeds(tiny, expected):
    engine = _engine(tiny)
    prompt = _prompts()[7]
    out = _generate(engine, [prompt], _greedy(n=3))[0]
    assert [o.token_ids for o in out.outputs] == [expected[7]] * 3 and [o.index for o in out.outputs] == [0, 1, 2]
    params = SamplingParams(n=4, temperature=1.0, seed=99, max_tokens=8, ignore_eos=True)
    out = _generate(engine, [prompt], params)[0]
    single = _generate(engine, [prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == single.outputs[0].token_ids  # sample 0 uses the seed itself
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert engine.stats().num_kv_blocks_free == engine.stats().num_kv_blocks_total


def test_logprobs_match_reference(tiny, reference):
    engine = _engine(tiny)
    prompt = _prompts()[3]
    out = _generate(engine, [prompt], _greedy(logprobs=5))[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(reference(ids).logits[0].float(), -1)[len(prompt) - 1 : -1]  # [NEW, V]
    total = 0.0
    for pos, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(entry[tok].logprob - ref[pos, tok].item()) < 1e-4 and entry[tok].rank == 1
        assert set(entry) == set(ref[pos].topk(5).indices.tolist())
        total += entry[tok].logprob
    assert abs(out.cumulative_logprob - total) < 1e-4


def _check_prompt_logprobs(reference, prompt: list[int], entries: list, k: int) -> None:
    """Entry j (j >= 1) holds prompt token j's logprob under transformers (log_softmax of row j - 1),
    its rank, and exactly the reference's top-k ids besides it; entry 0 is None."""
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), -1)  # [len, V]
    assert len(entries) == len(prompt) and entries[0] is None
    for j in range(1, len(prompt)):
        tok, entry, row = prompt[j], entries[j], ref[j - 1]
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert [t for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank) if lp.rank <= k] == top
        assert set(entry) == set(top) | {tok}


@pytest.mark.parametrize("overrides", [
    {},
    {"max_num_batched_tokens": 7},
    {"num_kv_blocks": 20, "max_model_len": 64},
], ids=["one-chunk", "chunked-prefill", "preemption"])
def test_prompt_logprobs_match_transformers(tiny, reference, expected, overrides, monkeypatch):
    from qwen_serve.worker import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", 5)  # several slices per step, split mid-chunk
    engine = _engine(tiny, **overrides)  # prefix caching on: a quarter of the prompts share a prefix
    ks = [0 if i % 2 else 5 for i in range(len(_prompts()))]  # both k in one batch
    outs = _generate(engine, _prompts(), [_greedy(prompt_logprobs=k) for k in ks])
    for prompt, out, k in zip(_prompts(), outs, ks):
        _check_prompt_logprobs(reference, prompt, out.prompt_logprobs, k)
    assert [o.outputs[0].token_ids for o in outs] == expected  # sampling is unchanged
    if "num_kv_blocks" in overrides:
        assert engine.stats().num_preemptions > 0  # recomputed prompts added no entries twice
    assert engine.outputs.prompt_logprobs == {}


def test_prompt_logprobs_skip_the_prefix_cache(tiny, reference):
    engine = _engine(tiny)
    prompts = _prompts()
    _generate(engine, [prompts[0]], _greedy())  # caches the shared 13-token prefix
    out = _generate(engine, [prompts[4]], _greedy(prompt_logprobs=3))[0]
    assert out.metrics.num_cached_tokens == 0
    _check_prompt_logprobs(reference, prompts[4], out.prompt_logprobs, 3)
    assert _generate(engine, [prompts[8]], _greedy())[0].metrics.num_cached_tokens == 12  # the cache was there
    assert _generate(engine, [prompts[8]], _greedy())[0].prompt_logprobs is None


def test_max_tokens_zero_scores_the_prompt_only(tiny, reference):
    engine = _engine(tiny, max_num_batched_tokens=16)
    prompt = _prompts()[6]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=0, prompt_logprobs=2, logprobs=2)
    engine.add_request("p", prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs) == 1 and outputs[0].finished  # one output, once the prompt is computed
    out = outputs[0]
    assert [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in out.outputs] == [([], "", "length", [])] * 2
    assert out.metrics.num_generation_tokens == 0
    _check_prompt_logprobs(reference, prompt, out.prompt_logprobs, 2)
    assert _generate(engine, [prompt[:1]], params)[0].prompt_logprobs == [None]
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and engine.outputs.prompt_logprobs == {}
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21).validate()


def test_repetition_penalty_matches_transformers(tiny, reference):
    engine = _engine(tiny)
    prompt = _prompts()[6]
    out = _generate(engine, [prompt], _greedy(repetition_penalty=1.8))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 repetition_penalty=1.8)
    assert out == ref[0, len(prompt):].tolist()


def test_presence_and_frequency_penalties_match_reference_loop(tiny, reference):
    engine = _engine(tiny)
    prompt = _prompts()[2]
    out = _generate(engine, [prompt], _greedy(presence_penalty=1.5, frequency_penalty=2.0))[0].outputs[0].token_ids
    tokens, generated = list(prompt), []
    for _ in range(NEW):
        with torch.no_grad():
            logits = reference(torch.tensor([tokens])).logits[0, -1].float()
        for t in set(generated):
            logits[t] -= 1.5 + 2.0 * generated.count(t)
        generated.append(int(logits.argmax()))
        tokens.append(generated[-1])
    assert out == generated


def test_logit_bias_matches_reference_loop(tiny, reference):
    """Greedy with logit_bias equals transformers' logits plus the bias, argmax, step by step (a
    moderate bias on two tokens, so both the biased and the model's own choices show up); -100 on
    a token keeps it out; logprobs stay those of the unbiased model."""
    engine = _engine(tiny)
    prompt = _prompts()[3]
    bias = {5: 2.5, 17: 4.0}
    out = _generate(engine, [prompt], _greedy(logit_bias=bias, logprobs=0))[0].outputs[0]
    tokens, generated, logprobs = list(prompt), [], []
    for _ in range(NEW):
        with torch.no_grad():
            logits = reference(torch.tensor([tokens])).logits[0, -1].float()
        biased = logits.clone()
        for t, b in bias.items():
            biased[t] += b
        generated.append(int(biased.argmax()))
        logprobs.append(float(torch.log_softmax(logits, -1)[generated[-1]]))
        tokens.append(generated[-1])
    assert out.token_ids == generated
    assert [e[t].logprob for e, t in zip(out.logprobs, generated)] == pytest.approx(logprobs, abs=1e-4)
    plain = _generate(engine, [prompt], _greedy())[0].outputs[0].token_ids
    banned = _generate(engine, [prompt], _greedy(logit_bias={t: -100.0 for t in set(plain)}))[0].outputs[0].token_ids
    assert not set(banned) & set(plain)
    # allowed_token_ids: the greedy choice among them, step by step; here alongside another request.
    allowed = sorted({5, 17, 40, 99} | set(plain[:2]))
    outs = _generate(engine, [prompt, _prompts()[4]], [_greedy(allowed_token_ids=allowed), _greedy()])
    tokens, restricted = list(prompt), []
    for _ in range(NEW):
        with torch.no_grad():
            logits = reference(torch.tensor([tokens])).logits[0, -1].float()
        restricted.append(allowed[int(logits[allowed].argmax())])
        tokens.append(restricted[-1])
    assert outs[0].outputs[0].token_ids == restricted
    assert outs[1].outputs[0].token_ids == _generate(engine, [_prompts()[4]], _greedy())[0].outputs[0].token_ids


def test_stop_strings_span_tokens_and_are_never_emitted(tiny):
    engine = _engine(tiny, tokenizer=CharTokenizer())
    prompt = _prompts()[4]
    free = _generate(engine, [prompt], _greedy(max_tokens=16))[0].outputs[0]
    text = free.text
    assert text == CharTokenizer().decode(free.token_ids)
    # A stop string made of the end of token 3's text and the start of token 4's.
    t3, t4 = (CharTokenizer().decode([t]) for t in free.token_ids[3:5])
    start = len(CharTokenizer().decode(free.token_ids[:3]))
    stop = t3[-1] + t4[0]
    cut = text.find(stop)
    assert cut <= start + len(t3) - 1
    engine.add_request("s", prompt, _greedy(max_tokens=16, stop=["zzzzzz", stop]))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            deltas.append(o.outputs[0].delta_text)
            final = o
    out = final.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut] and "".join(deltas) == text[:cut]
    assert all(stop not in d for d in deltas)
    included = _generate(engine, [prompt], _greedy(max_tokens=16, stop=stop, include_stop_str_in_output=True))[0]
    assert included.outputs[0].text == text[: cut + len(stop)]


def test_stop_tokens_eos_and_min_tokens(tiny, expected):
    prompt, exp = _prompts()[0], expected[0]
    stop_id = exp[3]
    first = exp.index(stop_id)
    engine = _engine(tiny, tokenizer=CharTokenizer(eos=[stop_id]))
    out = _generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=NEW))[0].outputs[0]
    assert out.token_ids == exp[: first + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = _generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == exp
    out = _generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=first + 2))[0].outputs[0]
    assert stop_id not in out.token_ids[: first + 2] and len(out.token_ids) >= first + 2
    plain = _engine(tiny)
    out = _generate(plain, [prompt], _greedy(stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == exp[: first + 1] and out.stop_reason == stop_id


def test_every_block_returns_after_finish_abort_and_preemption(tiny):
    engine = _engine(tiny, num_kv_blocks=24, max_model_len=64, max_num_batched_tokens=16)
    prompts = _prompts()
    for i, p in enumerate(prompts):
        n = 2 if i % 5 == 0 else 1
        engine.add_request(str(i), p, SamplingParams(n=n, temperature=1.0, seed=i, max_tokens=4 + i, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps in (2, 5, 9):  # aborts in the middle of prefills, decodes and waiting
            for rid in list(engine.requests)[::3]:
                engine.abort_request(rid)
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    engine.step()  # hands the finished ids to the runner
    assert engine.executor.runner.sampler.generators == {}


def test_streaming_deltas_add_up(tiny):
    engine = _engine(tiny, tokenizer=CharTokenizer())
    engine.add_request("x", _prompts()[1], _greedy(n=2, logprobs=2))
    texts, ids, lps = {0: "", 1: ""}, {0: [], 1: []}, {0: 0, 1: 0}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for c in o.outputs:
                texts[c.index] += c.delta_text
                ids[c.index] += c.delta_token_ids
                lps[c.index] += len(c.delta_logprobs)
    for c in o.outputs:
        assert texts[c.index] == c.text and ids[c.index] == c.token_ids and lps[c.index] == len(c.token_ids) == NEW


def test_final_only_outputs_come_once_with_everything(tiny):
    """A final-only request yields one output, at its finish, whose deltas hold all that the cumulative
    run of the same request streamed; the two runs generate the same."""
    runs = {}
    for kind in RequestOutputKind:
        engine = _engine(tiny, tokenizer=CharTokenizer())
        for i, prompt in enumerate(_prompts()[:6]):
            engine.add_request(f"r{i}", prompt, _greedy(n=2 if i % 2 else 1, logprobs=1, output_kind=kind,
                                                       max_tokens=NEW + i))
        outputs: dict[str, list] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outputs.setdefault(o.request_id, []).append(o)
        runs[kind] = outputs
    final_only, cumulative = runs[RequestOutputKind.FINAL_ONLY], runs[RequestOutputKind.CUMULATIVE]
    assert final_only.keys() == cumulative.keys()
    for rid, (only,) in final_only.items():
        last = cumulative[rid][-1]
        assert only.finished and len(cumulative[rid]) > 1
        for got, want in zip(only.outputs, last.outputs, strict=True):
            assert got.delta_token_ids == got.token_ids == want.token_ids
            assert got.delta_text == got.text == want.text
            assert got.delta_logprobs == got.logprobs == want.logprobs
            assert got.finish_reason == want.finish_reason == "length"


def test_llm_asks_for_final_outputs_without_changing_the_callers_params(tiny, expected):
    engine = _engine(tiny)
    params = _greedy()
    seen = []
    add = engine.add_request

    def spy(request_id, prompt, p, **kw):
        seen.append(p.output_kind)
        return add(request_id, prompt, p, **kw)

    engine.add_request = spy
    outs = _generate(engine, _prompts(), params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert seen == [RequestOutputKind.FINAL_ONLY] * len(expected)
    assert params.output_kind is RequestOutputKind.CUMULATIVE


def test_bad_requests_raise_value_error(tiny):
    engine = _engine(tiny, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", list(range(40)), _greedy())
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("p", [1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("s", [1, 2], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("v", [VOCAB + 5], _greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], _greedy())
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("b", [1, 2], _greedy(logit_bias={VOCAB: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("b", [1, 2], _greedy(logit_bias={3: float("nan")}))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        engine.add_request("a", [1, 2], _greedy(allowed_token_ids=[VOCAB]))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        engine.add_request("a", [1, 2], _greedy(allowed_token_ids=[]))
    with pytest.raises(ValueError, match="output_kind"):
        engine.add_request("k", [1, 2], _greedy(output_kind="final_only"))


def test_generation_config_defaults_fill_unset_fields(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny), dtype="float32", device="cpu", num_kv_blocks=64),
                       Path(tiny), generation_config={"temperature": 0.0, "max_new_tokens": 5, "top_k": 20})
    assert engine.default_sampling_params() == {"temperature": 0.0, "max_tokens": 5, "top_k": 20}
    out = _generate(engine, [[1, 2, 3]], SamplingParams(ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5
    out = _generate(engine, [[1, 2, 3]], SamplingParams(max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7


def test_structured_output_hook_masks_and_stops(tiny, monkeypatch):
    class OnlyFrom:
        """Allows tokens 5..9 and is complete after four of them."""

        def __init__(self):
            self.seen = 0

        def fill_mask(self, allowed):
            allowed[5:10] = True

        def accept(self, token_id):
            self.seen += 1
            return 5 <= token_id < 10

        def is_finished(self):
            return self.seen >= 4

    import qwen_serve.structured as structured

    # Patch the attribute, not sys.modules: once any test has imported the package, `import
    # qwen_serve.structured` finds it as an attribute of `qwen_serve` and never looks in sys.modules.
    monkeypatch.setattr(structured, "new_constraint", lambda spec, tokenizer, vocab_size: OnlyFrom())
    engine = _engine(tiny, tokenizer=CharTokenizer())
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=NEW, structured_output={"type": "json_object"})
    out = _generate(engine, [_prompts()[2]], params)[0]
    for c in out.outputs:
        assert len(c.token_ids) == 4 and all(5 <= t < 10 for t in c.token_ids) and c.finish_reason == "stop"


@pytest.mark.demo
def test_structured_output_with_real_grammar(tiny_chat_checkpoint):
    pytest.importorskip("qwen_serve.structured")
    import json

    llm = LLM(model=str(tiny_chat_checkpoint), dtype="float32", device="cpu", num_kv_blocks=256, max_model_len=512)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_output={"type": "json_schema", "schema": schema})
    out = llm.generate(["Give JSON:"], params, use_tqdm=False)[0].outputs[0]
    # An independent matcher of the same schema accepts every generated token.
    from qwen_serve.structured import new_constraint

    check = new_constraint(params.structured_output, llm.get_tokenizer(), vocab_size=llm.engine.model_config.vocab_size)
    assert out.token_ids and all(check.accept(t) for t in out.token_ids)
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text)["a"], int)


@pytest.mark.demo
@pytest.mark.slow
def test_demo_chat_matches_transformers(demo_folder, demo_gguf):
    """Our engine on the demo model against transformers loading the GGUF itself (its own dequantization)."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(demo_folder), dtype="float32", device="cpu", kv_cache_gb=0.5, max_model_len=2048)
    conversations = [[{"role": "user", "content": "用一句话介绍一下北京。"}],
                     [{"role": "user", "content": "Write a Python function that reverses a string."}]]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    outs = llm.chat(conversations, params, use_tqdm=False)
    ref = AutoModelForCausalLM.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    for conv, out in zip(conversations, outs):
        ids = tok.encode(tok.apply_chat_template(conv, add_generation_prompt=True))
        with torch.no_grad():
            gen = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, top_k=None, top_p=None,
                               temperature=None, eos_token_id=tok.eos_token_ids, pad_token_id=tok.eos_token_ids[0])
        expected = gen[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        assert got == expected[: len(got)] and (len(got) == 32 or got[-1] in tok.eos_token_ids)
        assert out.outputs[0].text.strip()


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{}, {"num_kv_blocks": 20, "max_model_len": 64, "max_num_batched_tokens": 7}],
                         ids=["default", "chunked-preempted"])
def test_cuda_engine_matches_transformers(tiny, expected, overrides):
    engine = _engine(tiny, device="cuda", **overrides)
    outs = _generate(engine, _prompts(), _greedy())
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


@pytest.mark.gpu
def test_cuda_kv_cache_sized_by_profiling(tiny):
    engine = _engine(tiny, device="cuda", num_kv_blocks=None, gpu_memory_utilization=0.5)
    assert engine.executor.runner.num_blocks * 4 >= 128


def test_cpu_packed_linears_are_exact(tiny):
    from qwen_serve.loader.model_loader import load_model, load_model_config
    from qwen_serve.kernels.cpu_linear import pack_linears, packing_works

    if not packing_works():
        pytest.skip("no oneDNN bfloat16 on this CPU")
    cfg = load_model_config(tiny)
    plain, packed = (load_model(tiny, cfg, torch.bfloat16, "cpu") for _ in range(2))
    assert pack_linears(packed) == 4 * cfg.num_hidden_layers + 1  # qkv, o, gate_up, down per layer; lm_head
    ids = torch.tensor(_prompts()[6])
    with torch.inference_mode():
        a = plain.compute_logits(plain(ids, torch.arange(len(ids))))
        b = packed.compute_logits(packed(ids, torch.arange(len(ids))))
    assert torch.equal(a, b)


def test_offline_bench_runs_on_a_random_config(tiny, tmp_path, capsys):
    import argparse
    import json

    from qwen_serve.bench import offline

    parser = argparse.ArgumentParser()
    offline.add_args(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--random-config", str(tiny / "config.json"), "--device", "cpu", "--dtype", "float32",
                              "--num-kv-blocks", "64", "--block-size", "4", "--max-model-len", "64", "--input-len", "5",
                              "--output-len", "3", "--num-prompts", "3", "--repeats", "1", "--compare-transformers",
                              "--output-json", str(out)])
    assert offline.run(args) == 0
    result = json.loads(out.read_text())
    assert result["qwen_serve"]["batch3"]["generated"] == 9 and result["transformers"]["batch1_runs"][0]["generated"] == 3
    assert "qwen_serve / transformers" in capsys.readouterr().out


def _mixed_params(expected) -> list[SamplingParams]:
    """One request of every kind the overlapped path treats differently, for the 16 prompts."""
    return [
        _greedy(), _greedy(max_tokens=1), _greedy(stop_token_ids=[expected[2][4]]), _greedy(n=2, logprobs=3),
        SamplingParams(temperature=1.0, seed=7, top_p=0.8, max_tokens=9, ignore_eos=True),
        SamplingParams(n=3, temperature=0.9, seed=8, top_k=20, max_tokens=7, ignore_eos=True),
        _greedy(stop=["b"]), SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=6),
        _greedy(repetition_penalty=1.3), _greedy(frequency_penalty=0.5, presence_penalty=0.2),
        _greedy(max_tokens=None), _greedy(max_tokens=3), SamplingParams(temperature=0.0, max_tokens=NEW),
        _greedy(logprobs=0), SamplingParams(temperature=0.7, seed=3, min_p=0.1, max_tokens=12, ignore_eos=True),
        _greedy(stop=["zz", "ab"], max_tokens=14),
    ]


def _summary(outs) -> list:
    return [[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason,
              [sorted((t, round(lp.logprob, 4)) for t, lp in e.items()) for e in c.logprobs or []])
             for c in o.outputs] for o in outs]


@pytest.mark.parametrize("overrides", [
    {},
    {"max_num_batched_tokens": 7},
    {"num_kv_blocks": 20, "max_model_len": 64},
    {"enable_prefix_caching": False, "max_num_seqs": 5},
], ids=["prefix-cache", "chunked-prefill", "preemption", "few-seats"])
def test_overlapped_steps_give_the_same_outputs(tiny, expected, overrides):
    """Overlapped steps (the next step launched before this one's tokens reach the host) change
    nothing a request sees: every kind of request, chunked prefill, preemption, length caps."""
    eos = expected[12][2]  # request 12 does not ignore eos: it stops early
    overrides = {"max_model_len": 64, **overrides}  # request 10 (max_tokens None) stops at max_model_len
    outs = {}
    for mode in ("off", "on"):
        engine = _engine(tiny, tokenizer=CharTokenizer(eos=[eos]), overlap_steps=mode, **overrides)
        llm, in_flight = LLM.from_engine(engine), []
        step = engine.step

        def watched_step():
            result = step()
            in_flight.append(engine._in_flight is not None)
            return result

        engine.step = watched_step
        outs[mode] = llm.generate(_prompts(), _mixed_params(expected), use_tqdm=False)
        assert any(in_flight) == (mode == "on")
        stats = engine.stats()
        assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
        if "num_kv_blocks" in overrides:
            assert stats.num_preemptions > 0
    assert _summary(outs["on"]) == _summary(outs["off"])
    assert outs["on"][12].outputs[0].finish_reason == "stop"
    assert outs["on"][10].outputs[0].finish_reason == "length"


def test_overlapped_steps_survive_aborts(tiny):
    """Aborts while a step is in flight: its tokens for the aborted requests are dropped, every
    block comes back, and no sequence is left a token ahead."""
    engine = _engine(tiny, num_kv_blocks=24, max_model_len=64, max_num_batched_tokens=16, overlap_steps="on")
    for i, p in enumerate(_prompts()):
        engine.add_request(str(i), p, SamplingParams(n=2 if i % 5 == 0 else 1, temperature=1.0, seed=i,
                                                      max_tokens=4 + i, ignore_eos=True))
    requests = list(engine.requests.values())
    steps, aborted = 0, set()
    while engine.has_unfinished_requests():
        assert not {o.request_id for o in engine.step()} & aborted  # nothing arrives after an abort
        steps += 1
        if steps in (2, 5, 9):
            for rid in list(engine.requests)[::3]:
                engine.abort_request(rid)
                aborted.add(rid)
    stats = engine.stats()
    assert aborted and stats.num_preemptions > 0 and stats.num_kv_blocks_free == stats.num_kv_blocks_total
    engine.step()  # collects the last step in flight, if any
    assert all(s.num_pending_tokens == 0 for r in requests for s in r.sequences)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: CPU weights packed for oneDNN
def test_close_frees_weights_and_cache_despite_lingering_references(tiny, dtype):
    engine = _engine(tiny, dtype=dtype)
    _generate(engine, [_prompts()[1]], _greedy(max_tokens=2))
    model, runner = engine.executor.runner.model, engine.executor.runner  # references that outlive the engine's use
    engine.add_request("left", _prompts()[2], _greedy())
    engine.close()
    assert not engine.has_unfinished_requests()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert runner.kv_cache.device.type == "meta" and runner.graphs is None
