"""generation.sampling: the shared logits -> probabilities rule and the sampler."""

from __future__ import annotations

import pytest
import torch

from course_lib.generation.sampling import logits_to_probs, next_token, sample


def test_temperature_zero_is_one_hot_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    probs = logits_to_probs(logits, temperature=0)
    assert probs.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert next_token(logits, temperature=0).tolist() == [1, 0]


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(logits_to_probs(logits, temperature=2.0), torch.softmax(logits / 2, -1))


def test_top_k_keeps_k_largest() -> None:
    probs = logits_to_probs(torch.tensor([1.0, 5.0, 3.0, 4.0]), top_k=2)
    assert (probs > 0).tolist() == [False, True, False, True]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = base.log()
    assert (logits_to_probs(logits, top_p=0.5) > 0).tolist() == [True, False, False, False]
    assert (logits_to_probs(logits, top_p=0.8) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, top_p=0.81) > 0).tolist() == [True, True, True, False]
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.81)[:3], base[:3] / 0.95)
    # the top token always survives, whatever top_p
    assert logits_to_probs(logits, top_p=0.01)[0].item() == pytest.approx(1.0)


def test_sample_frequencies_match_probs() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(40_000, 4)
    draws = sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    assert not (draws == 0).all()


def test_sampling_is_seeded() -> None:
    probs = torch.softmax(torch.randn(5, 50), -1)
    a = sample(probs, torch.Generator().manual_seed(3))
    b = sample(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_zero_probability_never_sampled() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5]).expand(10_000, 4)
    draws = sample(probs, torch.Generator().manual_seed(1))
    assert set(draws.unique().tolist()) == {1, 3}


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": 2.5}, "top_k"),
])
def test_bad_settings(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        logits_to_probs(torch.zeros(4), **kwargs)
