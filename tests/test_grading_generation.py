"""Hidden cases of chapters 4 and 7's checks (KV cache, speculative decoding): a right answer
passes them whatever the instructor's seed, and an answer that hard-codes the visible cases
fails them. The right and wrong answers are those of test_grading."""

from __future__ import annotations

import pytest
import torch
from check_contract import (
    HIDDEN_SEEDS,
    hidden_contract_tests,
    inputs_seen,
)
from test_grading import (
    accept_or_resample,
    attention_unscaled,
    cached_attention,
    expected_speedup,
    generate_last_token_only,
    generate_with_cache,
    speedup_ignoring_draft_cost,
)

from course_lib.grading import (
    check_accept_or_resample,
    check_cached_attention,
    check_cached_generation,
    check_expected_speedup,
    checks_generation,
)
from course_lib.grading.core import Context

test_hidden_right_answer_passes, test_hardcoding_fails_hidden = hidden_contract_tests({
    check_cached_attention: [cached_attention],
    check_cached_generation: [generate_with_cache],
    check_accept_or_resample: [accept_or_resample],
    check_expected_speedup: [expected_speedup],
}, [
    (check_cached_attention, cached_attention, attention_unscaled),
    (check_cached_generation, generate_with_cache, generate_last_token_only),
    (check_expected_speedup, expected_speedup, speedup_ignoring_draft_cost),
])


def _shapes(*args) -> tuple:
    """An input's sizes: a tensor's shape, a model's class and widths, anything else as is."""
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else
                 (type(a).__name__, a.config.vocab_size, a.config.n_embd) if
                 isinstance(a, torch.nn.Module) else a for a in args)


@pytest.mark.parametrize("check, right", [
    (check_cached_attention, cached_attention),
    (check_cached_generation, generate_with_cache),
], ids=lambda x: getattr(x, "__name__", ""))
def test_hidden_cases_have_other_shapes(check, right, capsys) -> None:
    visible = set(inputs_seen(check, [right], summary=_shapes))
    for seed in HIDDEN_SEEDS:
        assert set(inputs_seen(check, [right], seed, summary=_shapes)) - visible, \
            f"hidden seed {seed}: no new shape"


def test_hidden_statistical_pairs_are_new_and_comparable() -> None:
    """accept_or_resample advances a generator, so it cannot be memorized: show instead that the
    hidden (p, q) pairs are ones the visible cases never use, over another vocabulary size."""
    visible = [(p, q) for _, p, q in checks_generation._statistical_pairs()]
    for seed in HIDDEN_SEEDS:
        hidden = checks_generation._statistical_pairs(Context(seed))
        assert len(hidden) == len(visible)
        for _, p, q in hidden:
            vocab = p.shape[0]
            assert vocab != 8 and q.shape == (vocab,)
            assert not any(p.shape == vp.shape and torch.equal(p, vp) for vp, _ in visible)
            assert torch.allclose(p.sum(), torch.tensor(1.0)) and torch.allclose(q.sum(), torch.tensor(1.0))
            assert float(q[q > 0].min()) >= 0.1 / vocab  # >= 200 expected counts per token
            assert 0.3 <= float(torch.minimum(p, q).sum()) <= 0.95
        assert f"top-k = {vocab - int((hidden[1][2] == 0).sum())})" in hidden[1][0]


def test_hidden_accept_or_resample_sees_new_distributions(capsys, monkeypatch) -> None:
    """A learner that records the (p, q) it is given: hidden mode hands it pairs that visible
    mode never did, and a learner that is right only on the visible pairs fails hidden."""
    monkeypatch.setattr(checks_generation, "STATISTICAL_SAMPLES", 3000)  # enough, and faster
    def key(p, q, *_):
        return (tuple(p.tolist()), tuple(q.tolist()))

    seen_visible = set(inputs_seen(check_accept_or_resample, [accept_or_resample], summary=key))

    def right_on_visible_only(p, q, draft_token, generator):
        if key(p, q) in seen_visible:
            return accept_or_resample(p, q, draft_token, generator)
        return True, draft_token  # never resample

    assert check_accept_or_resample(right_on_visible_only, raise_on_fail=False).passed
    for seed in HIDDEN_SEEDS:
        result = check_accept_or_resample(right_on_visible_only, raise_on_fail=False,
                                          hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case, statistical test")


def test_hidden_generation_cases_have_no_near_ties() -> None:
    for seed in HIDDEN_SEEDS:
        model, cases = checks_generation.generation_setup(Context(seed))
        for prompt, n, want in cases:
            ids, gap = checks_generation.greedy_and_gap(model, prompt, n)
            assert gap > 0.1 and torch.equal(ids, want)
            assert torch.equal(want, checks_generation.greedy_without_cache(model, prompt, n))


def test_hidden_speedup_cases_keep_their_kinds() -> None:
    visible = checks_generation.SPEEDUP_CASES
    for seed in HIDDEN_SEEDS:
        hidden = checks_generation.speedup_cases(Context(seed))
        assert [note for *_, note in hidden] == [note for *_, note in visible]
        assert [(a, k, c) for a, k, c, *_ in hidden] != [(a, k, c) for a, k, c, *_ in visible]
        assert hidden[3][0] == 0.0 and hidden[4][0] == 1.0 and hidden[5][1] == 0 and hidden[1][2] == 0
        for alpha, k, c, want, _ in hidden:
            assert want == pytest.approx(expected_speedup(alpha, k, c), rel=1e-12)


@pytest.mark.parametrize("check, right", [
    (check_cached_attention, cached_attention),
    (check_cached_generation, generate_with_cache),
    (check_expected_speedup, expected_speedup),
], ids=lambda x: getattr(x, "__name__", ""))
def test_hidden_cases_depend_on_the_seed(check, right, capsys) -> None:
    """Two instructor seeds give two different sets of hidden inputs (not one fixed hidden set)."""
    first, second = (set(inputs_seen(check, [right], seed)) for seed in HIDDEN_SEEDS)
    visible = set(inputs_seen(check, [right]))
    assert first - visible - second and second - visible - first


def test_hidden_statistical_pairs_depend_on_the_seed() -> None:
    first, second = (checks_generation._statistical_pairs(Context(seed)) for seed in HIDDEN_SEEDS)
    for (_, p1, q1), (_, p2, q2) in zip(first, second, strict=True):
        assert p1.shape != p2.shape or not (torch.equal(p1, p2) or torch.equal(q1, q2))
