"""generation.speculative: greedy = target's greedy, sampled ~ target's distribution, caches in step;
GPT-2 and LLaMA families (our models and HF's), up to the real SmolLM2-135M as target."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib.evaluation.speed import greedy_decode
from course_lib.generation import speculative as spec
from course_lib.generation.sampling import logits_to_probs, sample
from course_lib.generation.speculative import (
    ChapterAdaptiveK,
    HFHeuristicK,
    SpeculativeDecoder,
    accept_or_resample,
    expected_speedup,
    expected_tokens_per_round,
    make_schedule,
)
from course_lib.models.families import from_hf
from course_lib.models.gpt import GPT, ContiguousKVCache, GPTConfig
from course_lib.models.llama import Llama, LlamaConfig

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast alone and far faster on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_gpt(seed: int, vocab: int = 101, n_positions: int = 64, n_embd: int = 48,
               n_layer: int = 2, n_head: int = 4, scale: float = 1.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd,
                          n_layer=n_layer, n_head=n_head)).eval()
    if scale != 1.0:  # flatter next-token distributions
        with torch.no_grad():
            model.transformer.wte.weight.mul_(scale)
            model.transformer.wpe.weight.mul_(scale)
    return model


def perturbed_copy(model: GPT, seed: int, noise: float) -> GPT:
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return copy


def random_hf(seed: int, n_embd: int, n_layer: int, vocab: int = 101, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def random_llama(seed: int, hidden: int, layers: int, heads: int, kv_heads: int):
    """A random HF LlamaForCausalLM: vocab 101, context 48, grouped-query attention."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(HFLlamaConfig(
        vocab_size=101, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=48,
        rope_theta=1000.0, tie_word_embeddings=True)).eval()


def cached_keys(cache) -> list[torch.Tensor]:
    """Per layer keys [1, heads, length, head_dim] held by either kind of cache."""
    if isinstance(cache, ContiguousKVCache):
        return [cache.k[i][:, :, :cache.length] for i in range(cache.k.shape[0])]
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers]
    return list(cache.key_cache)


@torch.no_grad()
def fresh_keys(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Keys of a fresh prefill of ``ids``: what a cache of len(ids) positions must hold."""
    if hasattr(model, "new_cache"):  # the course's GPT or Llama
        cache = model.new_cache(1, ids.shape[1])
        model(ids, cache)
        return cached_keys(cache)
    out = model(ids, use_cache=True)
    return cached_keys(out["cache"] if "cache" in out else out["past_key_values"])


def expected_draft_length(stats, prompt_len: int) -> int:
    """The draft's cached length implied by the invariant (see the module docstring)."""
    length, draft = prompt_len, 0
    for k, n in zip(stats.k_per_round, stats.accepted_per_round, strict=True):
        if k:  # it read its uncached tail and d_1..d_{k-1}
            draft = min(length + k - 1, length + n)
        length += n + 1
    return draft


def check_caches(result, target, draft, prompt_len: int) -> None:
    seq, stats = result.sequence, result.stats
    assert result.target_cache_length == seq.shape[1] - 1
    assert result.draft_cache_length == expected_draft_length(stats, prompt_len)
    for model, cache, length in ((target, result.target_cache, result.target_cache_length),
                                 (draft, result.draft_cache, result.draft_cache_length)):
        got, want = cached_keys(cache), fresh_keys(model, seq[:, :length])
        assert [g.shape[2] for g in got] == [length] * len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_target, tiny_draft):
    """The bundled pair as HF models and as course GPT copies, and a code prompt."""
    hf_t, tok = tiny_target
    hf_d, _ = tiny_draft
    text = "def _parse_args(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n"
    prompt = torch.tensor([tok.encode(text)])
    return {"gpt": (GPT.from_hf(hf_t), GPT.from_hf(hf_d)), "hf": (hf_t, hf_d)}, prompt


# --------------------------------------------------------------------------- greedy = target greedy


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_greedy_matches_target_on_tiny_pair(tiny_pairs, kind) -> None:
    pairs, prompt = tiny_pairs
    target, draft = pairs[kind]
    new = 37  # not a multiple of k + 1 for any k below
    reference = greedy_decode(target, prompt, new)
    seen_full_accept = seen_reject = False
    for k in (1, 3, 5):
        for adaptive in (None, "chapter", "hf"):
            if adaptive == "chapter" and k < 2:
                continue
            result = SpeculativeDecoder(target, draft, k=k, adaptive=adaptive).generate(prompt, new)
            assert result.tokens.shape == (1, new)
            assert torch.equal(result.tokens, reference), (k, adaptive)
            stats = result.stats
            assert stats.target_calls == stats.rounds < new  # it did speculate
            assert stats.draft_calls == sum(stats.k_per_round)
            seen_full_accept |= any(n == k > 0 for k, n in zip(stats.k_per_round, stats.accepted_per_round, strict=True))
            seen_reject |= any(n < k for k, n in zip(stats.k_per_round, stats.accepted_per_round, strict=True))
            check_caches(result, target, draft, prompt.shape[1])
    assert seen_full_accept and seen_reject  # both the bonus and the residual paths ran


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_greedy_up_to_the_context_limit_on_tiny_pair(tiny_pairs, kind) -> None:
    pairs, prompt = tiny_pairs
    target, draft = pairs[kind]
    context = target.config.n_positions
    long_prompt = prompt.repeat(1, context // prompt.shape[1] + 1)[:, :context - 13]
    decoder = SpeculativeDecoder(target, draft, k=5)
    result = decoder.generate(long_prompt, 13)
    assert torch.equal(result.tokens, greedy_decode(target, long_prompt, 13))
    assert result.sequence.shape[1] == context
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(long_prompt, 14)


def _random_pairs():
    target = random_gpt(0)
    return {
        "independent": (target, random_gpt(1, n_embd=16, n_layer=1, n_head=2)),
        "perturbed": (target, perturbed_copy(target, 2, noise=0.05)),
        "identical": (target, target),
    }


@pytest.mark.parametrize("name", ["independent", "perturbed", "identical"])
def test_greedy_matches_target_on_random_pairs(name) -> None:
    target, draft = _random_pairs()[name]
    prompt = torch.tensor([[5, 17, 3, 99, 42, 8, 61]])
    new = target.config.n_positions - prompt.shape[1]  # fill the context exactly
    reference = greedy_decode(target, prompt, new)
    for k in (1, 3, 5):
        for adaptive in (None, "chapter", "hf"):
            if adaptive == "chapter" and k < 2:
                continue
            result = SpeculativeDecoder(target, draft, k=k, adaptive=adaptive).generate(prompt, new)
            assert torch.equal(result.tokens, reference), (name, k, adaptive)
            check_caches(result, target, draft, prompt.shape[1])
            stats = result.stats
            if name == "identical":  # every drafted token accepted: k + 1 tokens per target call
                assert stats.accepted_per_round == stats.k_per_round
                assert stats.acceptance_rate == 1.0
                if adaptive is None:
                    assert stats.target_calls == math.ceil(new / (k + 1))


def test_greedy_matches_target_on_random_hf_pairs(random_hf_gpt2) -> None:
    target = random_hf_gpt2  # vocab 101, context 64
    drafts = {"hf": random_hf(1, n_embd=16, n_layer=1),
              "identical": target, "ours": GPT.from_hf(random_hf(1, n_embd=16, n_layer=1))}
    prompt = torch.tensor([[5, 17, 3, 99, 42, 8, 61]])
    new = 64 - prompt.shape[1]
    reference = greedy_decode(target, prompt, new)
    for name, draft in drafts.items():
        for k, adaptive in ((1, None), (3, "chapter"), (5, "hf")):
            result = SpeculativeDecoder(target, draft, k=k, adaptive=adaptive).generate(prompt, new)
            assert torch.equal(result.tokens, reference), (name, k)
            check_caches(result, target, draft, prompt.shape[1])


@pytest.mark.parametrize("new", list(range(1, 10)))
def test_exact_length_and_cache_invariant_for_every_stopping_point(new) -> None:
    target, draft = _random_pairs()["perturbed"]
    prompt = torch.tensor([[1]])  # a one-token prompt: the first round is all the prefill there is
    for k in (2, 4):
        result = SpeculativeDecoder(target, draft, k=k).generate(prompt, new)
        assert result.tokens.shape == (1, new)
        assert torch.equal(result.tokens, greedy_decode(target, prompt, new))
        assert sum(n + 1 for n in result.stats.accepted_per_round) == new
        check_caches(result, target, draft, 1)


def _sampled_runs(pairs, prompt):
    """Each (target, draft) pair decodes 30 tokens at temperature 1, top-k 20, from seed 0."""
    return [SpeculativeDecoder(target, draft, k=3, temperature=1.0, top_k=20)
            .generate(prompt, 30, generator=torch.Generator().manual_seed(0)) for target, draft in pairs]


def test_sampled_hf_and_course_gpt_paths_agree(random_hf_gpt2) -> None:
    hf_draft = random_hf(1, n_embd=16, n_layer=1)
    prompt = torch.tensor([[5, 17, 3]])
    runs = _sampled_runs([(random_hf_gpt2, hf_draft), (GPT.from_hf(random_hf_gpt2), GPT.from_hf(hf_draft))],
                         prompt)
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].stats.accepted_per_round == runs[1].stats.accepted_per_round
    check_caches(runs[0], random_hf_gpt2, hf_draft, prompt.shape[1])


# --------------------------------------------------------------------------- the distribution


def chi2_quantile(df: int, p: float = 0.999) -> float:
    """x with P(chi2_df <= x) = p: bisection on the regularised lower incomplete gamma."""
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if torch.special.gammainc(torch.tensor(df / 2, dtype=torch.float64),
                                  torch.tensor(mid / 2, dtype=torch.float64)) < p:
            lo = mid
        else:
            hi = mid
    return lo


def chi2_statistic(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of ``samples`` against ``probs`` (cells with expected < 5 pooled),
    and the p = 0.001 threshold for its degrees of freedom; inf if a 0-probability token shows."""
    n = samples.numel()
    observed = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    expected = probs.double() * n
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    threshold = chi2_quantile(int(keep.sum()) - 1)
    if observed[~keep].sum() > 0:  # a token of probability 0 was drawn
        return math.inf, threshold
    return ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item(), threshold


def test_chi2_quantile_known_values() -> None:
    assert chi2_quantile(1) == pytest.approx(10.828, abs=1e-3)
    assert chi2_quantile(15) == pytest.approx(37.697, abs=1e-3)


VOCAB = 16


@pytest.fixture(scope="module")
def small_pair():
    """Vocabulary of 16, different seeds: p and q differ (total variation ~0.4), q is spread out."""
    target = random_gpt(0, vocab=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, scale=0.15)
    draft = random_gpt(1, vocab=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, scale=0.15)
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        q = torch.softmax(target(prompt)[0, -1], -1)
        p = torch.softmax(draft(prompt)[0, -1], -1)
    assert 0.25 < 0.5 * (p - q).abs().sum() < 0.6
    return target, draft, prompt, p, q


def wrong_residual_q(p, q):
    return q  # bug: resample from the target's q instead of norm(max(q - p, 0))


def wrong_residual_p(p, q):
    return p  # bug: resample from the draft


@pytest.mark.parametrize("top_k", [None, 6])
def test_accept_or_resample_gives_exactly_q(small_pair, top_k, monkeypatch) -> None:
    target, draft, prompt, _, _ = small_pair
    with torch.no_grad():
        p = logits_to_probs(draft(prompt)[0, -1], 1.0, top_k)
        q = logits_to_probs(target(prompt)[0, -1], 1.0, top_k)
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    drafted = sample(p.expand(n, VOCAB), gen)
    accepted, out = accept_or_resample(p.expand(n, VOCAB), q.expand(n, VOCAB), drafted, gen)
    stat, threshold = chi2_statistic(out, q)
    assert stat < threshold
    # acceptance happens with probability sum(min(p, q)) = 1 - TV(p, q)
    assert accepted.float().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.01)
    for bug in (wrong_residual_q, wrong_residual_p):
        monkeypatch.setattr(spec, "residual_distribution", bug)
        _, out_bad = accept_or_resample(p.expand(n, VOCAB), q.expand(n, VOCAB), drafted,
                                        torch.Generator().manual_seed(0))
        bad_stat, _ = chi2_statistic(out_bad, q)
        assert bad_stat > threshold, bug.__name__
    monkeypatch.undo()


def exact_marginals(target: GPT, prompt: torch.Tensor) -> list[torch.Tensor]:
    """Target's exact distribution of the 1st, 2nd and 3rd new token (temperature 1)."""
    with torch.no_grad():
        q1 = torch.softmax(target(prompt)[0, -1].double(), -1)  # [V]
        t1 = torch.arange(VOCAB).view(VOCAB, 1)
        seq1 = torch.cat([prompt.expand(VOCAB, -1), t1], 1)
        q2 = torch.softmax(target(seq1)[:, -1].double(), -1)  # [V(t1), V]
        pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
        seq2 = torch.cat([prompt.expand(VOCAB * VOCAB, -1), pairs], 1)
        q3 = torch.softmax(target(seq2)[:, -1].double(), -1).view(VOCAB, VOCAB, VOCAB)
    joint12 = q1[:, None] * q2
    return [q1, joint12.sum(0), (joint12[:, :, None] * q3).sum((0, 1))]


def run_decoder(target, draft, prompt, runs: int, seed: int) -> torch.Tensor:
    decoder = SpeculativeDecoder(target, draft, k=2, temperature=1.0)
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([decoder.generate(prompt, 3, generator=gen).tokens for _ in range(runs)])


def test_decoder_samples_from_the_target_distribution(small_pair, monkeypatch) -> None:
    """3 tokens with k = 2: token 1 is accepted or resampled, token 3 is often the bonus."""
    target, draft, prompt, _, _ = small_pair
    marginals = exact_marginals(target, prompt)
    tokens = run_decoder(target, draft, prompt, runs=2500, seed=0)
    for position, probs in enumerate(marginals):
        stat, threshold = chi2_statistic(tokens[:, position], probs)
        assert stat < threshold, (position, stat, threshold)
    # the planted bug fails the same test on the first token
    monkeypatch.setattr(spec, "residual_distribution", wrong_residual_q)
    bad = run_decoder(target, draft, prompt, runs=800, seed=0)
    bad_stat, threshold = chi2_statistic(bad[:, 0], marginals[0])
    assert bad_stat > threshold


def test_acceptance_rule_is_min_one_q_over_p() -> None:
    p_tok = torch.full((200_000,), 0.5)
    gen = torch.Generator().manual_seed(0)
    for q in (0.0, 0.1, 0.4, 0.5, 0.9):
        rate = spec.acceptance_mask(p_tok, torch.full_like(p_tok, q), gen).float().mean().item()
        assert rate == pytest.approx(min(1.0, q / 0.5), abs=0.005)


def test_residual_distribution() -> None:
    p, q = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.2, 0.3, 0.1, 0.4])
    torch.testing.assert_close(spec.residual_distribution(p, q), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(spec.residual_distribution(q, q), q)  # p == q: never used, still valid


# --------------------------------------------------------------------------- formulas and schedules


def test_expected_speedup_known_values() -> None:
    assert expected_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert expected_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)
    assert expected_speedup(1 - 1e-9, 4, 0.1) == pytest.approx(5 / 1.4, rel=1e-6)
    assert expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / (0.2 * 1.4))
    assert expected_speedup(0.5, 3, 0.0) == pytest.approx(1.875)
    assert expected_speedup(0.5, 3, 0.1, verify_cost=2.0) == pytest.approx(1.875 / 2.3)
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens_per_round(1.0, 7) == 8.0
    assert expected_tokens_per_round(0.0, 7) == 1.0
    for bad in (dict(alpha=1.5, k=2, c=0.1), dict(alpha=0.5, k=-1, c=0.1), dict(alpha=0.5, k=2, c=-1)):
        with pytest.raises(ValueError):
            expected_speedup(**bad)


def test_chapter_rule_sequence() -> None:
    rule = ChapterAdaptiveK()
    assert rule.k == 4
    for _ in range(9):
        rule.update(4, 4)
    assert rule.k == 4  # no change before 10 rounds
    rule.update(4, 4)
    assert rule.k == 5  # mean 1.0 > 0.8
    for _ in range(10):
        rule.update(5, 5)
    for _ in range(10):
        rule.update(6, 6)
    for _ in range(10):
        rule.update(7, 7)
    assert rule.k == 8
    for _ in range(10):
        rule.update(8, 8)
    assert rule.k == 8  # capped
    for _ in range(10):
        rule.update(8, 4)  # 0.5: between the thresholds
    assert rule.k == 8
    for _ in range(70):
        rule.update(rule.k, 0)
    assert rule.k == 2  # floor
    rule.update(0, 0)  # an empty last round is not recorded
    assert len(rule.history) == 130


def test_chapter_rule_adjusts_every_tenth_round_only() -> None:
    rule = ChapterAdaptiveK()
    for _ in range(10):
        rule.update(4, 4)
    assert rule.k == 5
    for _ in range(9):  # the window is still mostly full acceptance, but no adjustment yet
        rule.update(5, 5)
    assert rule.k == 5


def test_hf_rule_sequence() -> None:
    rule = HFHeuristicK(3)
    ks = []
    for k_used, accepted in ((3, 3), (5, 5), (7, 2), (6, 0), (5, 0), (4, 0), (3, 0), (2, 0), (1, 0), (1, 1)):
        assert rule.k == k_used
        rule.update(k_used, accepted)
        ks.append(rule.k)
    assert ks == [5, 7, 6, 5, 4, 3, 2, 1, 1, 3]


def test_chapter_rule_drives_the_decoder() -> None:
    target = random_gpt(0)
    result = SpeculativeDecoder(target, target, k=2, adaptive="chapter").generate([[1, 2]], 60)
    ks = result.stats.k_per_round
    assert ks[:10] == [2] * 10 and ks[10] == 3  # all accepted -> one more token after 10 rounds


# --------------------------------------------------------------------------- bad input


class _FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


@pytest.mark.parametrize("kwargs, field", [
    (dict(k=0), "k"), (dict(k=2.0), "k"), (dict(k=True), "k"), (dict(k=1, adaptive="chapter"), "k"),
    (dict(k=9, adaptive="chapter"), "k"), (dict(adaptive="sometimes"), "adaptive"),
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(target_tokenizer=_FakeTokenizer({"a": 0}), draft_tokenizer=_FakeTokenizer({"b": 0})),
     "draft_tokenizer"),
])
def test_bad_arguments_name_the_field(kwargs, field) -> None:
    target = random_gpt(0)
    with pytest.raises(ValueError, match=field):
        SpeculativeDecoder(target, target, **kwargs)


def test_vocab_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        SpeculativeDecoder(random_gpt(0), random_gpt(1, vocab=100))


@pytest.mark.parametrize("prompt, new, field", [
    ([[1, 2, 3]], 62, "max_new_tokens"), ([[1, 2, 3]], 0, "max_new_tokens"),
    ([[1, 2, 3]], 2.0, "max_new_tokens"), ([[1, 2], [3, 4]], 4, "batch 1"),
    ([[1, 101]], 4, "vocabulary"), (torch.zeros(1, 0, dtype=torch.long), 4, "non-empty"),
])
def test_bad_generate_arguments(prompt, new, field) -> None:
    target = random_gpt(0)
    with pytest.raises(ValueError, match=field):
        SpeculativeDecoder(target, target).generate(prompt, new)


def test_make_schedule() -> None:
    assert make_schedule(None, 3).k == 3
    assert isinstance(make_schedule("chapter", 4), ChapterAdaptiveK)
    assert isinstance(make_schedule("hf", 4), HFHeuristicK)


def test_measure_cost_ratio_small_draft_is_cheaper() -> None:
    big = random_gpt(0, n_embd=256, n_layer=4)
    small = random_gpt(1, n_embd=16, n_layer=1, n_head=2)
    assert 0 < spec.measure_cost_ratio(big, small, prompt_len=8, calls=8, repeats=3) < 1
    assert spec.measure_verify_cost(small, k=3, prompt_len=8, calls=8, repeats=3) > 0


def test_greedy_matches_target_on_llama_family_pairs() -> None:
    """A LLaMA target (HF, GQA) with an HF LLaMA draft and with our Llama draft: target's greedy."""
    target = random_llama(0, 48, 2, 6, 2)
    drafts = {"hf": random_llama(1, 24, 1, 3, 1), "ours": Llama.from_hf(random_llama(1, 24, 1, 3, 1))}
    prompt = torch.tensor([[5, 17, 3, 99, 42, 8, 61]])
    new = 48 - prompt.shape[1]  # up to the context limit
    reference = greedy_decode(target, prompt, new)
    for name, draft in drafts.items():
        for k, adaptive in ((1, None), (4, "hf")):
            result = SpeculativeDecoder(target, draft, k=k, adaptive=adaptive).generate(prompt, new)
            assert torch.equal(result.tokens, reference), (name, k)
            check_caches(result, target, draft, prompt.shape[1])


# --------------------------------------------------------------------------- the real LLaMA model

SMOLLM2_NEW = 12


@pytest.fixture(scope="module")
def smollm2_target(smollm2):
    """SmolLM2-135M as HF LlamaForCausalLM and as our Llama, a code prompt, and a random draft:
    our Llama with SmolLM2's vocabulary (49152) and nothing learnt, so nearly every draft fails."""
    hf, tok = smollm2
    prompt = torch.tensor([tok.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n')])
    torch.manual_seed(0)
    random_draft = Llama(LlamaConfig(
        vocab_size=hf.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True)).eval()
    return {"ours": from_hf(hf), "hf": hf}, random_draft, prompt


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_greedy_matches_smollm2_target(smollm2_target, kind) -> None:
    """Target SmolLM2-135M (our Llama: ContiguousKVCache.truncate; HF: DynamicCache.crop): greedy
    speculative decoding returns its own greedy decode token for token, whether the draft is a
    random Llama (almost every draft rejected) or the target itself (every draft accepted)."""
    targets, random_draft, prompt = smollm2_target
    target = targets[kind]
    assert target.config.vocab_size == random_draft.config.vocab_size == 49152
    reference = greedy_decode(target, prompt, SMOLLM2_NEW)
    # random draft, k = 3: rejections all along, so both caches roll back round after round
    result = SpeculativeDecoder(target, random_draft, k=3).generate(prompt, SMOLLM2_NEW)
    assert torch.equal(result.tokens, reference)
    stats = result.stats
    assert stats.rounds >= SMOLLM2_NEW - 3  # at most a few lucky acceptances
    assert sum(n < k for k, n in zip(stats.k_per_round, stats.accepted_per_round, strict=True)) >= 8
    check_caches(result, target, random_draft, prompt.shape[1])
    # the target as its own draft, k = 4: every draft accepted, a bonus token every round
    result = SpeculativeDecoder(target, target, k=4).generate(prompt, SMOLLM2_NEW)
    assert torch.equal(result.tokens, reference)
    assert result.stats.accepted_per_round == result.stats.k_per_round
    assert result.stats.target_calls == math.ceil(SMOLLM2_NEW / 5)
    check_caches(result, target, target, prompt.shape[1])


def test_sampled_hf_and_course_llama_paths_agree() -> None:
    """Temperature 1, same seed: HF LLaMA models and our Llama copies draw the same tokens."""
    hf_target, hf_draft = random_llama(0, 48, 2, 6, 2), random_llama(1, 24, 1, 3, 1)
    prompt = torch.tensor([[5, 17, 3]])
    runs = _sampled_runs([(hf_target, hf_draft), (Llama.from_hf(hf_target), Llama.from_hf(hf_draft))], prompt)
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].stats.accepted_per_round == runs[1].stats.accepted_per_round
    assert any(n < k for k, n in zip(runs[0].stats.k_per_round, runs[0].stats.accepted_per_round, strict=True))
    check_caches(runs[0], hf_target, hf_draft, prompt.shape[1])
    check_caches(runs[1], Llama.from_hf(hf_target), Llama.from_hf(hf_draft), prompt.shape[1])


def random_small_llama(seed: int) -> Llama:
    """Our Llama over VOCAB tokens, embeddings scaled down so its distributions are spread out."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=16, rope_theta=100.0,
                              tie_word_embeddings=True)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.15)
    return model


def test_decoder_samples_from_the_target_distribution_llama() -> None:
    """The chi-square check of the GPT-2 pair above, on a pair of our Llama models (rotary
    positions, grouped-query attention); its planted bug is model-independent, not repeated."""
    target, draft = random_small_llama(0), random_small_llama(1)
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        q = torch.softmax(target(prompt)[0, -1], -1)
        p = torch.softmax(draft(prompt)[0, -1], -1)
    assert 0.25 < 0.5 * (p - q).abs().sum() < 0.7  # the draft is often rejected
    tokens = run_decoder(target, draft, prompt, runs=1200, seed=0)
    for position, probs in enumerate(exact_marginals(target, prompt)):
        stat, threshold = chi2_statistic(tokens[:, position], probs)
        assert stat < threshold, (position, stat, threshold)
