"""Speculative decoding by prompt lookup (engine/speculative.py) on a tiny random model: greedy output token
for token the same as without it (prefix cache, chunked prefill, preemption, stops, min_tokens, n > 1,
logprobs), sampled output in the same distribution (a two-sample test on token frequencies), every KV
block back at the end, the counters in /metrics, and bad --speculative-config refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm import LLM
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.engine.speculative import NgramProposer, ShadowDrafts, SpeculationGate, SpeculativeConfig

from conftest import make_tiny_checkpoint

VOCAB = 320
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("spec") / "m", vocab=VOCAB, max_pos=512)


class CharTokenizer:
    """Token i decodes to one or two letters, so stop strings span tokens."""

    eos_token_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) * (1 + i % 2) for i in ids)


def _engine(folder: Path, spec: str | None, gate: bool = False, **overrides) -> LLMEngine:
    """With `gate` off (these tests' default) speculation never pauses, so every step that can draft does:
    random tiny models accept few drafts, which would close the gate (tested on its own below)."""
    cfg = dict(model=str(folder), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_model_len=256)
    cfg.update(overrides)
    engine = LLMEngine(EngineConfig(**cfg, speculative_config=spec), folder, tokenizer=overrides.pop("tokenizer", None))
    if not gate:
        engine.spec_gate = SpeculationGate(min_gain=0.0)
    return engine


def _prompts() -> list[list[int]]:
    """Prompts that repeat themselves (lookup finds drafts) and one that does not."""
    gen = torch.Generator().manual_seed(0)
    motif = torch.randint(0, VOCAB, (7,), generator=gen).tolist()
    return [motif * 4, motif * 2 + motif[:3], torch.randint(0, VOCAB, (30,), generator=gen).tolist(), motif * 6]


def _generate(engine: LLMEngine, prompts, params) -> list:
    return LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True, **kw})


@pytest.mark.parametrize("overrides", [
    {},
    {"enable_prefix_caching": False},
    {"max_num_batched_tokens": 7},
    {"num_kv_blocks": 40, "max_model_len": 96},
], ids=["prefix-cache", "no-prefix-cache", "small-budget", "preemption"])
def test_greedy_output_is_unchanged(tiny, overrides):
    plain, spec = _engine(tiny, None, **overrides), _engine(tiny, NGRAM, **overrides)
    params = _greedy(logprobs=2)
    expected, got = _generate(plain, _prompts(), params), _generate(spec, _prompts(), params)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            assert le.keys() == lg.keys()
            assert all(abs(le[t].logprob - lg[t].logprob) < 1e-4 for t in le)
    stats = spec.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0  # lookup found and hit
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks  # every block returned
    again = _generate(spec, _prompts(), params)  # the prefix cache holds accepted tokens only
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]


def test_stops_max_tokens_min_tokens_and_n(tiny):
    """Drafts never run past max_tokens or a stop: the step's extra tokens after a stop are dropped."""
    prompt = _prompts()[0]
    free = _generate(_engine(tiny, None, tokenizer=CharTokenizer()), [prompt], _greedy(max_tokens=30))[0].outputs[0]
    stop_id = free.token_ids[9]
    stop_text = free.text[len(CharTokenizer().decode(free.token_ids[:12])):][:3]
    cases = [_greedy(max_tokens=n) for n in (1, 2, 5, 13)] + [
        _greedy(stop_token_ids=[stop_id]), _greedy(stop=[stop_text]), _greedy(stop=[stop_text], include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12, stop_token_ids=[stop_id]),
        _greedy(n=3, max_tokens=20)]
    for params in cases:
        plain = _generate(_engine(tiny, None, tokenizer=CharTokenizer()), [prompt], params)[0].outputs
        spec = _generate(_engine(tiny, NGRAM, tokenizer=CharTokenizer()), [prompt], params)[0].outputs
        assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in spec] == \
               [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in plain], params


def test_sampled_tokens_keep_the_distribution(tiny):
    """Seeded sampling draws in another order with speculation, so compare distributions: the tokens at
    output positions 1-4 (later positions come from drafted steps) over 1,200 samples each way, by a
    chi-square two-sample test per position (p > 0.001). Accepting every draft, or sampling the rejected
    row again from the whole distribution (the draft's share then ~1.8x), skews them far beyond that."""
    from scipy.stats import chi2_contingency

    prompt = _prompts()[0]
    params = [SamplingParams(temperature=0.7, top_k=3, max_tokens=5, ignore_eos=True, seed=i) for i in range(1200)]
    big = dict(max_num_seqs=256, num_kv_blocks=4096)
    spec_engine = _engine(tiny, NGRAM.replace("}", ', "disable_by_batch_size": 100000}'), **big)
    runs = {}
    for name, engine in (("plain", _engine(tiny, None, **big)), ("spec", spec_engine)):
        runs[name] = [o.outputs[0].token_ids for o in _generate(engine, [prompt] * len(params), params)]
    stats = spec_engine.stats()  # enough drafts accepted and rejected for the test to see a wrong rule
    assert stats.spec_num_drafts > 600 and 150 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens - 300
    for pos in range(1, 5):
        tokens = sorted({r[pos] for name in runs for r in runs[name]})
        table = [[sum(r[pos] == t for r in runs[name]) for t in tokens] for name in runs]
        assert chi2_contingency(table).pvalue > 0.001, (pos, table)


def test_counters_reach_metrics(tiny):
    from qwen_serve.server.metrics import ServerMetrics

    engine = _engine(tiny, NGRAM)
    _generate(engine, _prompts()[:1], _greedy())
    text = ServerMetrics(engine.stats).render().decode()
    s = engine.stats()
    assert f"qwen_serve_spec_decode_num_draft_tokens_total {float(s.spec_num_draft_tokens)}" in text
    assert f"qwen_serve_spec_decode_num_accepted_tokens_total {float(s.spec_num_accepted_tokens)}" in text
    assert "qwen_serve_spec_decode_acceptance_rate" in text and "qwen_serve_spec_decode_mean_acceptance_length" in text
    assert "spec_decode" not in ServerMetrics(_engine(tiny, None).stats).render().decode()


def test_proposals():
    spec = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2))
    assert spec.propose([1, 2, 3, 4, 9, 1, 2, 3], 10) == [4, 9, 1]  # the 3-gram [1, 2, 3] seen before
    assert spec.propose([5, 2, 3, 7, 8, 2, 3], 10) == [7, 8, 2]  # only a 2-gram matches
    assert spec.propose([1, 2, 1, 2, 3, 1, 2], 10) == [3, 1, 2]  # the latest earlier occurrence
    assert spec.propose([1, 2, 3, 4, 1, 2, 3], 1) == [4] and spec.propose([1, 2, 3, 4], 10) == []
    assert spec.propose([7, 7, 7], 0) == []


@pytest.mark.parametrize("text,match", [
    ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be a positive integer"),
    ('{"method": "ngram", "num_speculative_tokens": 17}', r"num_speculative_tokens must be 1\.\.16"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method 'eagle' is not supported"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "method draft_model needs \"model\""),
    ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}', r"unknown keys \['lookahead'\]"),
    ('{"model": "demo", "num_speculative_tokens": 2, "prompt_lookup_max": 3}', r"unknown keys \['prompt_lookup_max'\]"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}', "prompt_lookup_min \\(5\\) exceeds"),
    ("ngram", "not a JSON object"),
])
def test_bad_configs_are_refused_at_start(text, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="demo", speculative_config=text)


def test_structured_output_verifies_only_drafts_its_grammar_allows(tiny_chat_checkpoint):
    """A JSON schema whose answer repeats itself (a list of the same objects): drafts are cut to what the
    grammar allows, each verifying row is masked by the grammar after the drafts before it, and the output
    is the one without speculation, token for token, and valid."""
    import json

    from qwen_serve.tokenizer.tokenizer import Tokenizer

    schema = {"type": "array", "minItems": 6, "maxItems": 6, "items": {
        "type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "size": {"enum": [1, 2]}},
        "required": ["colour", "size"], "additionalProperties": False}}
    tok = Tokenizer.from_folder(tiny_chat_checkpoint)
    prompt = tok.encode("List six shapes as JSON:")
    params = SamplingParams(temperature=0.0, max_tokens=200, structured_output={"type": "json_schema", "schema": schema})
    outs = {}
    for name, spec in (("plain", None), ("spec", NGRAM)):
        engine = _engine(tiny_chat_checkpoint, spec, tokenizer=tok, max_model_len=1024)
        outs[name] = _generate(engine, [prompt], params)[0].outputs[0]
        if spec:
            assert engine.stats().spec_num_accepted_tokens > 0
    assert outs["spec"].token_ids == outs["plain"].token_ids
    assert len(json.loads(outs["spec"].text)) == 6


def test_draft_model_proposes_and_output_is_unchanged(tiny, tmp_path):
    """A draft model of the same vocabulary: the served model itself as its own draft has every draft
    accepted under greedy decoding (its argmax is the draft), another random model some; the output is
    the one without speculation in both cases, and the draft's engine is closed with the served one's."""
    other = make_tiny_checkpoint(tmp_path / "other", vocab=VOCAB, max_pos=512, seed=3)
    prompts = _prompts()[1:3]
    plain = _generate(_engine(tiny, None), prompts, _greedy(max_tokens=12))
    for draft, all_accepted in ((tiny, True), (other, False)):
        engine = _engine(tiny, f'{{"model": "{draft}", "num_speculative_tokens": 3}}')
        outs = _generate(engine, prompts, _greedy(max_tokens=12))
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
        s = engine.stats()
        assert s.spec_num_draft_tokens > 0
        assert (s.spec_num_accepted_tokens == s.spec_num_draft_tokens) == all_accepted
        draft_engine = engine.scheduler.proposer.engine
        engine.close()
        assert draft_engine.block_manager.num_free_blocks == draft_engine.block_manager.num_blocks


def test_draft_model_of_another_vocabulary_is_refused(tiny, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "v", vocab=VOCAB + 64, max_pos=512)
    with pytest.raises(ValueError, match=r"draft model '.*' has another vocabulary \(384 logits, the served model 320\)"):
        _engine(tiny, f'{{"model": "{other}", "num_speculative_tokens": 3}}')


@pytest.mark.gpu
def test_on_cuda_the_lookup_gate_opens_where_drafts_would_be_accepted(tiny):
    """The GPU's gate (overlapped steps, graph-captured decode): closed at first, opened by the drafts it
    proposed without verifying on text that repeats itself, and the greedy tokens are plain decoding's."""
    cuda = dict(device="cuda", num_kv_blocks=None, gpu_memory_utilization=0.5)
    baseline = _engine(tiny, None, **cuda)
    plain = _generate(baseline, [_prompts()[3]], _greedy(max_tokens=60))[0].outputs[0].token_ids
    baseline.close()
    engine = _engine(tiny, NGRAM, gate=True, **cuda)
    try:
        assert engine.overlap and engine.shadow is not None
        assert _generate(engine, [_prompts()[3]], _greedy(max_tokens=60))[0].outputs[0].token_ids == plain
        assert engine.stats().spec_num_drafts > 0 and engine.stats().spec_num_accepted_tokens > 0
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_on_cuda_greedy_output_is_unchanged(tiny, spec):
    """On a GPU (verify steps eager beside graph-captured decode steps; a draft model's engine with a KV cache
    of fixed size next to the served model's profiled one): the same greedy tokens as without speculation."""
    config = NGRAM if spec == "ngram" else f'{{"model": "{tiny}", "num_speculative_tokens": 3}}'
    cuda = dict(device="cuda", num_kv_blocks=None, gpu_memory_utilization=0.5)
    # The first engine's profiled KV cache holds half the card until it is closed.
    baseline = _engine(tiny, None, **cuda)
    plain = _generate(baseline, _prompts(), _greedy(max_tokens=24))
    baseline.close()
    engine = _engine(tiny, config, **cuda)
    try:
        outs = _generate(engine, _prompts(), _greedy(max_tokens=24))
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
        assert engine.stats().spec_num_accepted_tokens > 0
    finally:
        engine.close()


def test_gate_pauses_speculation_that_gains_nothing_and_measures_again():
    gate = SpeculationGate()

    def probe_then_pause(accepted: int) -> tuple[int, int]:
        """Steps the gate stays open while each gains `accepted`, then how many steps it stays closed."""
        opened = closed = 0
        while gate.open():
            gate.record(accepted, 1)
            opened += 1
        while not gate.open():
            closed += 1
        gate.record(accepted, 1)  # the step that found it open again
        return opened, closed + 1

    assert probe_then_pause(0) == (4, 64)  # a probe of 4 steps that gained nothing
    # Probes that fail again double the pause, up to max_pause_steps.
    assert [probe_then_pause(0)[1] for _ in range(4)] == [128, 256, 512, 512]
    for _ in range(1000):  # ~1 accepted draft a step (a code-editing workload): never closes
        assert gate.open()
        gate.record(1, 1)
    assert gate.closes == 0  # recovered: the next pause is the shortest again
    gate.record(0, 4)  # one poor step among good ones moves the average, it does not close the gate
    assert gate.open()
    gate = SpeculationGate()
    for accepted in (0, 0, 0, 1):  # a probe is judged on its mean (0.25 >= 0.1), not on its first steps
        assert gate.open()
        gate.record(accepted, 1)
    assert gate.open() and gate.gain == 0.25
    for _ in range(6):  # then the average: 0.25 * (15/16)^n < 0.1 after 15 steps that gain nothing
        gate.record(0, 1)
    assert gate.open()


def test_shadow_gate_opens_on_drafts_it_did_not_verify_and_closes_on_verified_ones():
    """Lookup's gate: closed from the start; unverified proposals' outcomes open it at 2 min_gain, verify
    steps' outcomes close it below min_gain; no probes, no pauses."""
    gate = SpeculationGate(shadow=True)
    assert not gate.open()
    for _ in range(200):  # proposals the decoded tokens never matched: it never opens
        gate.record_shadow(0)
    assert not gate.open() and gate.gain == 0.0
    gate.record_shadow(4)  # one proposal whose 4 drafts all matched: 4/16 = 0.25 >= 0.2
    assert gate.open()
    steps = 0
    while gate.open():  # verify steps that gain nothing: 0.25 * (15/16)^n < 0.1 after 15
        gate.record(0, 2)
        steps += 1
    assert steps == 15 and gate.paused_for == 0
    assert not SpeculationGate(min_gain=0.0, shadow=True).closed  # engines that do not overlap: open


def test_shadow_drafts_count_what_verifying_would_have_accepted():
    class Fixed:
        def propose(self, token_ids, max_tokens):
            return [7, 8, 9][:max_tokens] if token_ids[-1] == 6 else []

    shadow = ShadowDrafts(Fixed(), 3)
    shadow.propose(1, [5, 6])  # guesses positions 2, 3, 4
    shadow.propose(2, [5, 5])  # no drafts: decided at once, 0
    assert shadow.resolve(2, [5, 5]) == [0] and 2 not in shadow.pending
    assert shadow.resolve(1, [5, 6, 7]) == []  # so far so good: undecided
    shadow.propose(1, [5, 6, 7])  # not due: one proposal every k + 1 = 4 tokens
    assert len(shadow.pending[1]) == 1
    shadow.propose(1, [5, 6, 7, 8, 9, 1])  # due (6 >= 2 + 4); the last token is not 6: no drafts
    assert shadow.resolve(1, [5, 6, 7, 8, 9, 1]) == [3, 0]
    shadow.propose(3, [6])
    assert shadow.resolve(3, [6, 7, 1]) == [1]  # decided by the mismatch before all three are decoded
    shadow.propose(3, [6])
    shadow.forget(3)  # a sequence gone
    assert 3 not in shadow.pending and shadow.resolve(3, [6, 7]) == []


def test_gate_on_an_engine_closes_where_drafting_gains_nothing(tiny):
    """An engine that overlaps its steps (as on a GPU), sampling at temperature 1 from a random model: lookup
    drafts from the repeating prompt would be rejected and the output repeats nothing, so the gate, closed
    from the start, never opens: no step verifies drafts (all stay overlapped). Without overlap the gate
    stays open."""
    assert _engine(tiny, NGRAM, gate=True).spec_gate.min_gain == 0.0
    params = SamplingParams(temperature=1.0, max_tokens=60, ignore_eos=True, seed=0)
    gated = _engine(tiny, NGRAM, gate=True, overlap_steps="on")
    assert len(_generate(gated, [_prompts()[0]], params)[0].outputs[0].token_ids) == 60
    assert not gated.spec_gate.open() and gated.spec_gate.gain < gated.spec_gate.min_gain
    assert gated.stats().spec_num_drafts == 0
    assert gated.shadow.pending == {}  # the finished sequence's proposals are dropped


def test_gate_on_an_engine_opens_where_lookup_drafts_would_be_accepted(tiny):
    """The same overlapped engine, greedy on text that repeats itself: the unverified proposals match what
    is decoded, the gate opens and verify steps follow, and the output is plain decoding's."""
    params = _greedy(max_tokens=60)
    plain = _generate(_engine(tiny, None), [_prompts()[3]], params)[0].outputs[0].token_ids
    gated = _engine(tiny, NGRAM, gate=True, overlap_steps="on")
    assert _generate(gated, [_prompts()[3]], params)[0].outputs[0].token_ids == plain
    assert gated.stats().spec_num_drafts > 0 and gated.stats().spec_num_accepted_tokens > 0
