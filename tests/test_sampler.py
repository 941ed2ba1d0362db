"""Batched sampler against reference computations written out plainly, row by row."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.layers.sampler import SamplingTensors, _apply_penalties, sample

V = 40


def _tensors(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generators=None, **extra):
    temps = torch.full((n,), float(temperature))
    greedy = temps == 0
    return SamplingTensors(
        temperature=torch.where(greedy, torch.ones(n), temps), random_rows=(~greedy).nonzero().squeeze(1).tolist(),
        all_greedy=bool(greedy.all()),
        top_k=[top_k] * n, top_p=torch.full((n,), float(top_p)) if top_p < 1 else None,
        min_p=torch.full((n,), float(min_p)) if min_p > 0 else None,
        generators=generators or [None] * n, default_generator=torch.Generator().manual_seed(0), **extra,
    )


def _reference_probs(logits, temperature, top_k, top_p, min_p):
    """The filtered distribution of one row, computed the slow and obvious way."""
    probs = torch.softmax(logits / temperature, dim=-1)
    order = sorted(range(V), key=lambda i: -probs[i].item())
    keep = order[:top_k] if top_k > 0 else order
    keep_mass = sum(probs[i].item() for i in keep)  # top_p applies to the distribution after top_k
    mass, kept = 0.0, set()
    for i in keep:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i].item() / keep_mass
    kept_probs = {i: probs[i].item() for i in kept}
    cap = max(kept_probs.values())  # min_p is relative to the most likely token (after top_k/top_p)
    kept_probs = {i: p for i, p in kept_probs.items() if p >= min_p * cap}
    total = sum(kept_probs.values())
    return torch.tensor([kept_probs.get(i, 0.0) / total for i in range(V)])


def test_greedy_is_argmax():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    out = sample(logits.clone(), _tensors(5, temperature=0.0))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_a_given_argmax_is_used_unless_bans_or_penalties_change_the_logits():
    """The decode CUDA graph hands sample() its rows' argmax. It is taken as given for plain greedy rows
    (a marker that is not the argmax shows it), and recomputed after a ban or a penalty, where the
    graph's argmax may be the very token that was banned or penalised."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1)
    marker = (best + 1) % V
    out = sample(logits.clone(), _tensors(3, temperature=0.0), marker.clone())
    assert out.token_ids.tolist() == marker.tolist()

    banned = (torch.tensor([0]), best[:1])
    out = sample(logits.clone(), _tensors(3, temperature=0.0, banned=banned), best.clone())
    assert out.token_ids[0] != best[0] and out.token_ids[1:].tolist() == best[1:].tolist()

    counts = torch.zeros(3, V)
    counts[1, best[1]] = 1.0
    out = sample(logits.clone(), _tensors(3, temperature=0.0, presence=torch.full((3,), 100.0), output_counts=counts),
                 best.clone())
    assert out.token_ids[1] != best[1] and out.token_ids[[0, 2]].tolist() == best[[0, 2]].tolist()


def test_filtered_distribution_matches_reference():
    base = torch.randn(V, generator=torch.Generator().manual_seed(2)) * 2
    draws = 6000
    for temperature, top_k, top_p, min_p in [(0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 0.6, 0.0),
                                             (1.0, 8, 0.8, 0.0), (1.0, 0, 1.0, 0.2)]:
        out = sample(base.repeat(draws, 1), _tensors(draws, temperature, top_k, top_p, min_p))
        freq = torch.bincount(out.token_ids, minlength=V).float() / draws
        ref = _reference_probs(base, temperature, top_k, top_p, min_p)
        assert (freq[ref == 0] == 0).all(), (temperature, top_k, top_p, min_p)
        assert (freq - ref).abs().max() < 0.03, (temperature, top_k, top_p, min_p)


def test_seeded_rows_ignore_their_companions():
    base = torch.randn(3, V, generator=torch.Generator().manual_seed(3))

    def draw(rows, top_ks, steps=20):
        gens = [torch.Generator().manual_seed(7)] + [None] * (len(rows) - 1)
        st = _tensors(len(rows), 1.0, generators=gens)
        st.top_k = top_ks
        return [sample(base[rows].clone(), st).token_ids[0].item() for _ in range(steps)]

    # Row 0 with seed 7: alone, with companions, and with a companion that forces a full sort.
    alone = draw([0], [0])
    assert draw([0, 1, 2], [0, 0, 0]) == alone
    assert draw([0, 1], [0, 3]) == alone
    assert len(set(alone)) > 1
    with_k = draw([0], [4])
    assert draw([0, 2], [4, 9]) == with_k and draw([0, 1], [4, 0]) == with_k


def test_penalties_match_reference():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, V, generator=gen)
    prompt = [[1, 2, 3], [5]]
    output = [[3, 3, 7], [5, 8, 8, 8]]
    counts = torch.zeros(2, V)
    seen = torch.zeros(2, V, dtype=torch.bool)
    for r in range(2):
        for t in output[r]:
            counts[r, t] += 1
        seen[r, prompt[r] + output[r]] = True
    st = _tensors(2, temperature=0.0, presence=torch.tensor([0.5, 0.0]), frequency=torch.tensor([0.25, 1.0]),
                  repetition=torch.tensor([1.3, 2.0]), output_counts=counts, seen_mask=seen)
    got = logits.clone()
    _apply_penalties(got, st)
    ref = logits.clone()
    for r, (pres, freq, rep) in enumerate([(0.5, 0.25, 1.3), (0.0, 1.0, 2.0)]):
        for t in set(prompt[r] + output[r]):
            ref[r, t] = ref[r, t] / rep if ref[r, t] > 0 else ref[r, t] * rep
        for t in set(output[r]):
            ref[r, t] -= freq * output[r].count(t) + pres
    torch.testing.assert_close(got, ref)


def test_logprobs_ranks_and_top_alternatives():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    st = _tensors(3, temperature=1.0, logprob_rows=torch.tensor([0, 2]), max_logprobs=4)
    out = sample(logits.clone(), st)
    ref = torch.log_softmax(logits, -1)
    for j, row in enumerate([0, 2]):
        tok = out.token_ids[row].item()
        assert abs(out.sampled_logprob[j].item() - ref[row, tok].item()) < 1e-5
        assert out.sampled_rank[j].item() == 1 + int((ref[row] > ref[row, tok]).sum())
        vals, ids = ref[row].topk(4)
        assert out.top_ids[j].tolist() == ids.tolist()
        torch.testing.assert_close(out.top_logprobs[j], vals)


def test_logit_bias_shifts_the_distribution_not_the_logprobs():
    """A bias b on token t multiplies its odds by e^b (checked on drawn frequencies against the
    biased softmax); the logprobs reported are the raw model's."""
    base = torch.randn(V, generator=torch.Generator().manual_seed(3))
    draws = 6000
    bias = (torch.arange(draws), torch.full((draws,), 4), torch.full((draws,), 2.0))
    out = sample(base.repeat(draws, 1), _tensors(draws, 1.0, bias=bias))
    biased = base.clone()
    biased[4] += 2.0
    freq = torch.bincount(out.token_ids, minlength=V).float() / draws
    assert (freq - torch.softmax(biased, -1)).abs().max() < 0.03
    one = sample(base[None].clone(), _tensors(1, 0.0, bias=(torch.tensor([0]), torch.tensor([4]), torch.tensor([100.0])),
                                              logprob_rows=torch.tensor([0]), max_logprobs=1))
    assert one.token_ids.tolist() == [4]
    assert one.sampled_logprob.item() == pytest.approx(torch.log_softmax(base, -1)[4].item(), abs=1e-5)


def test_penalties_apply_while_tokens_are_banned():
    """A min_tokens ban and a penalty in the same step: both change the logits."""
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 5] = 2.0, 1.0
    counts = torch.zeros(1, V)
    counts[0, 5] = 1.0
    st = _tensors(1, temperature=0.0, banned=(torch.tensor([0]), torch.tensor([7])), presence=torch.tensor([0.5]),
                  output_counts=counts)
    sample(logits, st)
    assert logits[0, 7] == float("-inf") and logits[0, 5].item() == pytest.approx(0.5)


def test_allowed_token_ids_restrict_the_draw_not_the_logprobs():
    base = torch.randn(V, generator=torch.Generator().manual_seed(4))
    allowed = [2, 9, 30]
    draws = 300
    st = _tensors(draws, 1.0, allowed=(torch.arange(draws), torch.arange(draws).repeat_interleave(3),
                                       torch.tensor(allowed).repeat(draws)))
    out = sample(base.repeat(draws, 1), st)
    assert set(out.token_ids.tolist()) == set(allowed)
    # Row 1 of 2 is restricted; row 0 is free; logprobs stay the raw model's.
    two = base.repeat(2, 1)
    st = _tensors(2, 0.0, allowed=(torch.tensor([1]), torch.tensor([0, 0]), torch.tensor([9, 30])),
                  logprob_rows=torch.tensor([0, 1]), max_logprobs=0)
    out = sample(two.clone(), st)
    assert out.token_ids[0] == base.argmax() and out.token_ids[1] == (9 if base[9] > base[30] else 30)
    raw = torch.log_softmax(base, -1)
    assert out.sampled_logprob[1].item() == pytest.approx(raw[out.token_ids[1]].item(), abs=1e-5)


def test_banned_tokens_are_never_sampled():
    logits = torch.zeros(200, V)
    rows = torch.arange(200).repeat_interleave(V - 2)
    tokens = torch.arange(V - 2).repeat(200)
    out = sample(logits, _tensors(200, temperature=1.0, banned=(rows, tokens)))
    assert set(out.token_ids.tolist()) == {V - 2, V - 1}


def _step_sampler():
    from qwen_serve.worker.step_sampler import StepSampler

    return StepSampler(torch.device("cpu"), seed=0, eos_token_ids=[3],
                       to_device=lambda values, dtype: torch.tensor(values, dtype=dtype))


def _seqs(*params):
    from qwen_serve.engine.request import Request

    return [Request(f"r{i}", [1, 2, 3], p, 0.0).sequences[0] for i, p in enumerate(params)]


def _rows(*seqs):
    """The sampling rows the engine would send for these sequences (engine/step_builder.py)."""
    from qwen_serve.engine.step_builder import _sample_row

    return [_sample_row(s) for s in seqs]


def test_step_sampler_reuses_tensors_only_for_the_same_rows_and_static_settings():
    from qwen_serve.engine.sampling_params import SamplingParams

    sampler = _step_sampler()
    a, b = _seqs(SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9))
    first = sampler._sampling_tensors(_rows(a, b), V)
    assert sampler._sampling_tensors(_rows(a, b), V) is first  # the same sequences, in order
    swapped = sampler._sampling_tensors(_rows(b, a), V)
    assert swapped is not first and swapped.random_rows == [0]
    # Settings that change from step to step are built every step: the ban lifts once min_tokens are out.
    (c,) = _seqs(SamplingParams(temperature=0.0, min_tokens=1))
    banned = sampler._sampling_tensors(_rows(c), V)
    assert banned.banned is not None
    c.token_ids.append(7)
    assert sampler._sampling_tensors(_rows(c), V).banned is None
    (d,) = _seqs(SamplingParams(temperature=0.0, presence_penalty=0.5))
    assert sampler._sampling_tensors(_rows(d), V) is not sampler._sampling_tensors(_rows(d), V)
