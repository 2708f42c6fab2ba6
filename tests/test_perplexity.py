"""Perplexity: token counts, the two protocols, and hand computations on small cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from course_lib.evaluation.perplexity import perplexity


class Bigram(torch.nn.Module):
    """Logits depend only on the previous token, so every scored token's NLL is known exactly."""

    def __init__(self, vocab=11, context=16):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.config = SimpleNamespace(n_positions=context)

    def forward(self, ids):
        return self.table[ids]


def _bigram_nll(model, ids, pairs):
    logp = F.log_softmax(model.table, dim=-1)
    return -sum(logp[ids[t - 1], ids[t]].item() for t in pairs) / len(pairs)


IDS = torch.randint(0, 11, (50,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("stride", [1, 5, 15])
def test_overlapping_windows_score_every_token_once(stride):
    model = Bigram()
    res = perplexity(model, ids=IDS, max_length=16, stride=stride, progress=False)
    assert res.n_tokens == 49  # tokens 1..49: the first has no context
    want = _bigram_nll(model, IDS, range(1, 50))
    assert res.nll == pytest.approx(want, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(want), rel=1e-6)


def test_stride_equal_to_window_skips_each_window_first_token():
    model = Bigram()
    res = perplexity(model, ids=IDS, max_length=16, stride=16, progress=False)
    pairs = [t for t in range(1, 50) if t % 16]  # tokens 16, 32 and 48 start a window
    assert res.n_tokens == 46
    assert res.nll == pytest.approx(_bigram_nll(model, IDS, pairs), rel=1e-6)


def test_gptq_protocol_drops_tail_and_window_boundaries():
    model = Bigram()
    res = perplexity(model, ids=IDS, protocol="gptq", max_length=16, progress=False)
    assert res.n_windows == 3  # 50 // 16; the last 2 tokens are dropped
    assert res.n_tokens == 3 * 15
    pairs = [w * 16 + j for w in range(3) for j in range(1, 16)]  # no pair crosses a window
    assert res.nll == pytest.approx(_bigram_nll(model, IDS, pairs), rel=1e-6)


def test_stride_protocol_context_by_brute_force(random_hf_gpt2):
    """With stride 1 and window L, token t is predicted from the previous min(t, L - 1) tokens."""
    ids = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(2))
    L = 8
    res = perplexity(random_hf_gpt2, ids=ids, max_length=L, stride=1, progress=False)
    total = 0.0
    with torch.no_grad():
        for t in range(1, 30):
            ctx = ids[max(0, t - (L - 1)) : t + 1]
            logits = random_hf_gpt2(ctx[None]).logits[0, -2]
            total -= F.log_softmax(logits, -1)[ids[t]].item()
    assert res.n_tokens == 29
    assert res.nll == pytest.approx(total / 29, rel=1e-5)


def test_stride_without_overlap_equals_gptq_on_whole_windows(random_hf_gpt2):
    ids = torch.randint(0, 101, (64,), generator=torch.Generator().manual_seed(3))
    a = perplexity(random_hf_gpt2, ids=ids, max_length=16, stride=16, progress=False)
    b = perplexity(random_hf_gpt2, ids=ids, max_length=16, protocol="gptq", progress=False)
    # Without overlap a window's first token has no context in either protocol, so it is not
    # scored: the same 4 x 15 tokens, the same number.
    assert a.n_tokens == b.n_tokens == 60
    assert a.n_windows == b.n_windows == 4
    assert a.nll == pytest.approx(b.nll, rel=1e-6)


def test_works_on_text_with_hf_and_our_model(random_hf_gpt2, tiny_draft):
    from course_lib.models.gpt import GPT

    model, tok = tiny_draft
    text = "def add(a, b):\n    return a + b\n" * 20
    hf = perplexity(model, tok, text, max_length=64, stride=32, progress=False)
    ours = perplexity(GPT.from_hf(model), tok, text, max_length=64, stride=32, progress=False)
    assert hf.n_tokens == ours.n_tokens == len(tok(text)["input_ids"]) - 1
    assert ours.perplexity == pytest.approx(hf.perplexity, rel=1e-4)
    assert 1.0 < hf.perplexity < 50  # repetitive code is easy for the draft


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text=""), "non-empty text"),
        (dict(text="   \n"), "non-empty text"),
        (dict(text="abc " * 50, max_length=16, stride=17), r"stride must be in \[1, max_length=16\]"),
        (dict(text="abc " * 50, max_length=99), r"max_length must be in \[2, 64\]"),
        (dict(text="abc " * 50, protocol="ppl"), "unknown protocol"),
        (dict(text="abc " * 10, protocol="gptq", max_length=64), "at least one window of 64"),
    ],
)
def test_bad_input_is_a_clear_error(random_hf_gpt2, tiny_draft, kwargs, match):
    tok = tiny_draft[1]
    with pytest.raises(ValueError, match=match):
        perplexity(random_hf_gpt2, tok, progress=False, **kwargs)
