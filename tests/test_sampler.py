"""Sampling parameters validation and the batched sampler, checked against plain references."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.penalties import apply_penalties
from engine.sampler import Sampler, SequenceSamplingState, _filter_thresholds
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_state(params: SamplingParams, vocab: int, prompt: list[int] | None = None,
               eos: tuple[int, ...] = ()) -> SequenceSamplingState:
    return SequenceSamplingState(params, prompt or [], vocab, CPU, eos)


# --- SamplingParams -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
    ({"stop_token_ids": ["3"]}, "stop_token_ids"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"seed": True}, "seed"),
])
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_params_normalize_and_defaults() -> None:
    p = SamplingParams(stop="END", stop_token_ids=[5, 7], temperature=1, top_k=0)  # type: ignore[arg-type]
    assert p.stop == ("END",) and p.stop_token_ids == (5, 7)
    assert isinstance(p.temperature, float) and not p.is_greedy and not p.top_k_enabled
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    g = SamplingParams.greedy(max_tokens=5, logprobs=2)
    assert g.is_greedy and g.max_tokens == 5 and g.logprobs == 2
    assert not SamplingParams().needs_penalties
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(presence_penalty=-0.5).needs_penalties
    assert SamplingParams(frequency_penalty=0.5).needs_penalties
    assert SamplingParams(min_tokens=16, max_tokens=16, logprobs=0, top_k=-1, seed=0).min_tokens == 16
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


def test_params_module_needs_no_torch() -> None:
    # A bare `engine` package stands in for engine/__init__.py, which imports the whole engine.
    package_dir = str(Path(__file__).resolve().parent.parent / "engine")
    code = ("import sys, types; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
            f"pkg = types.ModuleType('engine'); pkg.__path__ = [{package_dir!r}]; "
            "sys.modules['engine'] = pkg; "
            "from engine.sampling_params import SamplingParams; SamplingParams(top_p=0.5)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_state_rejects_out_of_vocab_ids() -> None:
    """(Stop token ids are checked against the vocabulary once, by engine.request.RequestValidator.)"""
    with pytest.raises(InvalidRequestError, match="prompt"):
        make_state(SamplingParams(repetition_penalty=1.2), 10, prompt=[1, 10])
    state = make_state(SamplingParams(), 10)
    with pytest.raises(ValueError):
        state.append(10)
    with pytest.raises(ValueError, match="logits"):
        Sampler(10, CPU)(torch.zeros(2, 10), [state])


# --- greedy and penalties -----------------------------------------------------------------------

def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    states = [make_state(SamplingParams.greedy(), 100) for _ in range(8)]
    out = Sampler(100, CPU, seed=0)(logits, states)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_logits_in_bf16_are_sampled_as_their_fp32_copy() -> None:
    """The runner hands over the lm_head's bf16 output: greedy picks it as is, everything else from
    its exact fp32 copy (same tokens and logprobs as given that copy)."""
    torch.manual_seed(1)
    logits = torch.randn(6, 100).bfloat16()
    for params in (SamplingParams.greedy(), SamplingParams(temperature=0, logprobs=3),
                   SamplingParams(temperature=0.8, seed=5, top_p=0.9, logprobs=2),
                   SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias={7: 4.0})):
        outs = [Sampler(100, CPU, seed=0)(x, [make_state(params, 100, [7, 9]) for _ in range(6)])
                for x in (logits, logits.float())]
        assert outs[0] == outs[1], params


def reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                        params: SamplingParams) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        p = params.repetition_penalty
        out[t] = out[t] / p if out[t] > 0 else out[t] * p
    for t in set(output):
        out[t] -= params.frequency_penalty * output.count(t)
        out[t] -= params.presence_penalty
    return out


PENALTY_MIXES = {
    "all": [
        SamplingParams.greedy(repetition_penalty=1.3),
        SamplingParams.greedy(repetition_penalty=0.7, presence_penalty=0.5),
        SamplingParams.greedy(frequency_penalty=0.8),
        SamplingParams.greedy(frequency_penalty=-1.0, presence_penalty=-0.3),
        SamplingParams.greedy(repetition_penalty=1.8, frequency_penalty=2.0, presence_penalty=1.5),
        SamplingParams.greedy(),  # no penalties in the same batch
    ],
    "frequency only": [SamplingParams.greedy(frequency_penalty=1.5),
                       SamplingParams.greedy(frequency_penalty=0.4)],
    "presence only": [SamplingParams.greedy(presence_penalty=2.0), SamplingParams.greedy()],
    "repetition only": [SamplingParams.greedy(repetition_penalty=1.5),
                        SamplingParams.greedy(repetition_penalty=0.5)],
}


@pytest.mark.parametrize("mix", PENALTY_MIXES)
def test_penalties_match_reference_over_steps(mix: str) -> None:
    gen = torch.Generator().manual_seed(1)
    param_list = PENALTY_MIXES[mix]
    vocab, batch, steps = 40, len(param_list), 8
    prompts = [torch.randint(0, vocab, (int(torch.randint(0, 12, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(batch)]
    states = [make_state(p, vocab, prompt) for p, prompt in zip(param_list, prompts, strict=True)]
    histories: list[list[int]] = [[] for _ in range(batch)]
    sampler = Sampler(vocab, CPU, seed=0)
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen) * 3
        expected = [reference_penalties(logits[i].tolist(), prompts[i], histories[i], param_list[i])
                    for i in range(batch)]
        tracked = [(i, s.penalties) for i, s in enumerate(states) if s.penalties is not None]
        rows = [i for i, _ in tracked]
        got = apply_penalties(  # every term given, neutral where a row does not use it
            logits[rows],
            torch.stack([p.prompt_mask for _, p in tracked]),
            torch.stack([p.output_counts for _, p in tracked]),
            torch.tensor([param_list[i].repetition_penalty for i in rows]),
            torch.tensor([param_list[i].frequency_penalty for i in rows]),
            torch.tensor([param_list[i].presence_penalty for i in rows]))
        torch.testing.assert_close(got, torch.tensor([expected[i] for i in rows]))
        penalized = logits.clone()
        sampler._penalize(penalized, states)  # the sampler's own call, unused terms left out
        torch.testing.assert_close(penalized, torch.tensor(expected))
        tokens = sampler(logits, states).token_ids
        assert tokens == [max(range(vocab), key=lambda t: expected[i][t]) for i in range(batch)]
        # Force repeats into the history so counts above 1 are exercised.
        for i, s in enumerate(states):
            for t in (tokens[i], int(torch.randint(0, 5, (1,), generator=gen))):
                s.append(t)
                histories[i].append(t)
    assert states[0].num_generated == 2 * steps


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    vocab, eos, stop_id = 10, 2, 7
    params = [SamplingParams.greedy(min_tokens=3, stop_token_ids=(stop_id,)),
              SamplingParams(min_tokens=3, stop_token_ids=(stop_id,), seed=3)]
    states = [make_state(p, vocab, eos=(eos,)) for p in params]
    logits = torch.zeros(2, vocab)
    logits[:, eos] = 20.0
    logits[:, stop_id] = 19.0
    sampler = Sampler(vocab, CPU, seed=0)
    for step in range(5):
        tokens = sampler(logits, states).token_ids
        if step < 3:
            assert eos not in tokens and stop_id not in tokens
        else:
            assert tokens == [eos, eos]
        for s, t in zip(states, tokens, strict=True):
            s.append(t)


def test_works_inside_and_outside_inference_mode() -> None:
    vocab = 16
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, min_tokens=1, seed=0)
    with torch.inference_mode():
        inside = make_state(params, vocab, prompt=[1, 2], eos=(3,))
        logits = torch.randn(2, vocab)
    outside = make_state(params, vocab, prompt=[1, 2], eos=(3,))
    sampler = Sampler(vocab, CPU, seed=0)
    for step in range(6):
        if step % 2:
            with torch.inference_mode():
                tokens = sampler(logits.clone(), [inside, outside]).token_ids
                inside.append(tokens[0])
        else:
            tokens = sampler(logits, [inside, outside]).token_ids
            inside.append(tokens[0])
        outside.append(tokens[1])
    assert inside.num_generated == outside.num_generated == 6
    assert inside.penalties is not None and outside.penalties is not None
    assert float(inside.penalties.output_counts.sum()) == 6.0


# --- filters, temperature, seeds ----------------------------------------------------------------

def reference_allowed(row: list[float], p: SamplingParams) -> set[int]:
    """Tokens top-k, then top-p on the renormalized top-k, then min-p may keep (float64 python)."""
    order = sorted(range(len(row)), key=lambda t: -row[t])
    if p.top_k > 0:
        order = order[:p.top_k]
    top = row[order[0]]
    weights = [math.exp(row[t] - top) for t in order]
    total = sum(weights)
    kept, mass = [], 0.0
    for t, w in zip(order, weights, strict=True):
        if mass >= p.top_p:
            break
        kept.append(t)
        mass += w / total
    return {t for t in kept if math.exp(row[t] - top) >= p.min_p}


FILTERS = [
    SamplingParams(top_k=1), SamplingParams(top_k=5), SamplingParams(top_k=300),
    SamplingParams(top_p=0.3), SamplingParams(top_p=0.9), SamplingParams(top_p=0.9, top_k=20),
    SamplingParams(min_p=0.1), SamplingParams(min_p=0.5, top_p=0.95), SamplingParams(top_k=3, min_p=0.3),
    SamplingParams(),
]


def test_filter_thresholds_keep_exactly_the_reference_set() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab = 500
    for trial in range(3):
        x = torch.randn(len(FILTERS), vocab, generator=gen) * (1 + 2 * trial)
        threshold = _filter_thresholds(x, FILTERS)
        assert threshold is not None
        for i, p in enumerate(FILTERS):
            allowed = set(torch.nonzero(x[i] >= threshold[i]).flatten().tolist())
            assert allowed == reference_allowed(x[i].tolist(), p), (trial, p)
    # The top-k-only path (no sort) must agree too.
    x = torch.randn(2, vocab, generator=gen)
    only_k = [SamplingParams(top_k=4), SamplingParams(top_k=50)]
    threshold = _filter_thresholds(x, only_k)
    assert threshold is not None
    for i, p in enumerate(only_k):
        allowed = set(torch.nonzero(x[i] >= threshold[i]).flatten().tolist())
        assert allowed == reference_allowed(x[i].tolist(), p)
    assert _filter_thresholds(x, [SamplingParams(), SamplingParams(top_k=vocab)]) is None


def test_sampling_never_leaves_allowed_set() -> None:
    vocab, draws = 300, 400
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=gen) - 4
    row[:6] = torch.tensor([5.0, 4.6, 4.2, 3.8, 3.4, 3.0])
    sampler = Sampler(vocab, CPU, seed=0)
    for p in [SamplingParams(top_k=3), SamplingParams(top_p=0.6), SamplingParams(min_p=0.25),
              SamplingParams(top_p=0.9, top_k=4, seed=11)]:
        allowed = reference_allowed(row.tolist(), p)
        assert 1 < len(allowed) <= 6
        # Seeded params get a different seed per draw (one seed would repeat one token).
        states = [make_state(replace(p, seed=None if p.seed is None else i), vocab) for i in range(draws)]
        seen = set(sampler(row.expand(draws, vocab), states).token_ids)
        assert seen == allowed, p  # every allowed token is likely enough to appear in 400 draws


def test_temperature_two_token_frequencies() -> None:
    n = 4000
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(n, 2)
    sampler = Sampler(2, CPU, seed=0)
    for temperature, p_one in [(1.0, 0.75), (2.0, math.sqrt(3) / (1 + math.sqrt(3))), (0.25, 81 / 82)]:
        states = [make_state(SamplingParams(temperature=temperature), 2) for _ in range(n)]
        freq = sum(sampler(logits, states).token_ids) / n
        sigma = math.sqrt(p_one * (1 - p_one) / n)
        assert abs(freq - p_one) < 5 * sigma + 1e-3, (temperature, freq, p_one)


def test_seeded_rows_reproducible_across_batch_compositions() -> None:
    vocab, steps = 1000, 12
    gen = torch.Generator().manual_seed(4)
    target_logits = [torch.randn(vocab, generator=gen) for _ in range(steps)]
    target_params = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, repetition_penalty=1.1)

    def run(batch: int, position: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(vocab, CPU, seed=sampler_seed)
        others = [SamplingParams(), SamplingParams(seed=7, top_k=40), SamplingParams.greedy(logprobs=3)]
        states = [make_state(others[j % 3], vocab) for j in range(batch)]
        states[position] = make_state(target_params, vocab, prompt=[1, 2, 3])
        noise = torch.Generator().manual_seed(sampler_seed)
        produced = []
        for step in range(steps):
            logits = torch.randn(batch, vocab, generator=noise)
            logits[position] = target_logits[step]
            tokens = sampler(logits, states).token_ids
            for s, t in zip(states, tokens, strict=True):
                s.append(t)
            produced.append(tokens[position])
        return produced

    alone = run(1, 0, 0)
    assert run(5, 3, 1) == alone
    assert run(17, 0, 2) == alone
    assert run(9, 8, 3) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_unseeded_rows_follow_sampler_seed() -> None:
    vocab = 100
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(5))
    runs = [Sampler(vocab, CPU, seed=s)(logits, [make_state(SamplingParams(), vocab) for _ in range(16)])
            for s in (9, 9, 10)]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


# --- logprobs -----------------------------------------------------------------------------------

def test_logprobs_from_raw_logits_with_top_n() -> None:
    vocab = 64
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, vocab, generator=gen) * 2
    params = [SamplingParams.greedy(logprobs=5, repetition_penalty=1.5),
              SamplingParams(logprobs=0, temperature=0.5, top_k=10),
              SamplingParams(),
              SamplingParams(logprobs=20, presence_penalty=1.0, seed=1)]
    states = [make_state(p, vocab, prompt=[0, 1, 2]) for p in params]
    out = Sampler(vocab, CPU, seed=0)(logits, states)
    reference = logits.log_softmax(-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(reference[i, lp.token_id].item(), abs=1e-5)
        n = params[i].logprobs
        assert n is not None and len(lp.top) == n
        values, ids = reference[i].topk(max(n, 1))
        assert [t for t, _ in lp.top] == ids.tolist()[:n]
        assert [v for _, v in lp.top] == pytest.approx(values.tolist()[:n], abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:], strict=False))


# --- timing (printed, not asserted) -------------------------------------------------------------

def _time_ms(fn: object, repeat: int = 5) -> float:
    """Best of `repeat` runs: the cores are shared, the minimum is the least noisy estimate."""
    assert callable(fn)
    fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def test_timing_print() -> None:
    vocab, batch = 49152, 64
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    sampler = Sampler(vocab, CPU, seed=0)
    greedy = [make_state(SamplingParams.greedy(), vocab) for _ in range(batch)]
    mixed_params = [SamplingParams.greedy(), SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9),
                    SamplingParams(top_k=50), SamplingParams(min_p=0.05, seed=3),
                    SamplingParams(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2),
                    SamplingParams.greedy(logprobs=5), SamplingParams(top_p=0.95, seed=9, logprobs=1)]
    prompt = torch.randint(0, vocab, (200,), generator=gen).tolist()
    mixed = [make_state(mixed_params[i % len(mixed_params)], vocab, prompt=prompt) for i in range(batch)]
    no_top_p = [make_state(SamplingParams(temperature=0.8, top_k=40), vocab) for _ in range(batch)]
    greedy_ms = _time_ms(lambda: sampler(logits, greedy))
    mixed_ms = _time_ms(lambda: sampler(logits, mixed))
    top_k_ms = _time_ms(lambda: sampler(logits, no_top_p))
    print(f"\nsampler B={batch} V={vocab}: greedy fast path {greedy_ms:.2f} ms, "
          f"mixed batch {mixed_ms:.2f} ms, temperature+top-k {top_k_ms:.2f} ms")
