"""Checks for the exercises of chapters 4 and 7 (KV cache, speculative decoding).

The references are written here in plain torch and `course_lib.models.gpt`, never with
`course_lib.generation`, so a check keeps meaning the same thing while the library changes:

* cached attention is compared with ``F.scaled_dot_product_attention(..., is_causal=True)``
  over the whole sequence, sliced at the new positions;
* cached greedy generation is compared with greedy decoding that recomputes the full sequence
  at every step, on a small seeded random :class:`~course_lib.models.gpt.GPT` that counts the
  tokens it is fed (a loop that ignores its cache gets the right tokens, but feeds far more);
* the acceptance / residual step of speculative decoding is checked on known cases and then
  statistically: draft tokens drawn from p, passed through the learner's function, must come
  out distributed as q (a chi-square goodness-of-fit test), and accepted at the rate
  ``alpha = sum(min(p, q))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_lib.grading.core import (
    Context,
    call_many,
    check,
    expect_close,
    expect_tensor,
    unpack_tuple,
)
from course_lib.models.gpt import GPT, GPTConfig

POINTS = {
    "cached_attention": 3,
    "cached_generation": 3,
    "accept_or_resample": 3,
    "expected_speedup": 1,
}

#: Family-wise false-alarm rate of the statistical checks: a correct function fails the
#: accept/resample check at most this often (whatever random numbers it happens to draw).
P_VALUE_THRESHOLD = 1e-3
#: Draft tokens per (p, q) pair in the statistical part of the accept/resample check.
STATISTICAL_SAMPLES = 20_000


# --- chapter 4: attention with a KV cache ----------------------------------------------------

#: (batch, heads, head_dim, tokens per call): the first call fills an empty cache (prefill),
#: later calls add one token (decoding) or several (a speculative-decoding verify step).
ATTENTION_CASES = [
    (1, 1, 4, [3, 1, 1]),
    (2, 3, 7, [5, 1, 1, 1, 1]),
    (1, 2, 16, [1, 3, 1, 2]),
    (3, 1, 5, [1, 1, 6, 1]),
    (2, 4, 8, [9, 1, 4, 1]),
]


def attention_cases(ctx: Context) -> list[tuple[int, int, int, list[int]]]:
    """:data:`ATTENTION_CASES`, or in hidden mode cases of the same structure (a call of one
    token stays one token, a call of several becomes 2 .. 9) with other B, H, D and lengths."""
    if not ctx.hidden:
        return ATTENTION_CASES
    rng = ctx.rng(404)
    return [(rng.randint(1, 3), rng.randint(1, 4), rng.randint(3, 16),
             [1 if n == 1 else rng.randint(2, 9) for n in chunks])
            for _, _, _, chunks in ATTENTION_CASES]


def _chunks_label(chunks: list[int]) -> str:
    return "then ".join(f"{n} token{'s' if n > 1 else ''} " for n in chunks).strip()


@check("attention with a KV cache", POINTS["cached_attention"])
def check_cached_attention(ctx: Context, fn) -> None:
    """``fn(q, k_new, v_new, k_cache, v_cache) -> (out, k_cache, v_cache)`` for one layer.

    ``q``, ``k_new``, ``v_new`` are [B, H, T, D] for T new tokens at positions S .. S+T-1;
    ``k_cache``, ``v_cache`` are [B, H, S, D] (S = 0 at first). ``out`` [B, H, T, D] is causal
    softmax attention (scale 1/sqrt(D)): new token i sees keys 0 .. S+i. The returned caches
    are [B, H, S+T, D]: the old ones with the new keys / values appended along dim 2.
    """
    gen = ctx.generator(401)
    for b, h, d, chunks in attention_cases(ctx):
        length = sum(chunks)
        q_all = torch.randn(b, h, length, d, generator=gen) * 1.5  # peaky enough that masks matter
        k_all = torch.randn(b, h, length, d, generator=gen)
        v_all = torch.randn(b, h, length, d, generator=gen)
        want_all = F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True)
        k_cache = torch.zeros(b, h, 0, d)
        v_cache = torch.zeros(b, h, 0, d)
        start = 0
        for step, n in enumerate(chunks):
            end = start + n
            ctx.case = (f"B={b}, H={h}, D={d}, calls of {_chunks_label(chunks)}: call {step + 1} "
                        f"({n} new token{'s' if n > 1 else ''} after {start} cached)")
            new = slice(start, end)
            out = fn(q_all[:, :, new].clone(), k_all[:, :, new].clone(), v_all[:, :, new].clone(),
                     k_cache, v_cache)
            out, k_cache, v_cache = unpack_tuple(ctx, out, 3, "out, k_cache, v_cache")
            k_cache = expect_tensor(ctx, k_cache, "returned k_cache", shape=(b, h, end, d))
            v_cache = expect_tensor(ctx, v_cache, "returned v_cache", shape=(b, h, end, d))
            for got, want, name in ((k_cache, k_all, "k"), (v_cache, v_all, "v")):
                if not torch.equal(got, want[:, :, :end]):
                    ctx.fail(f"returned {name}_cache should be the old cache followed by {name}_new "
                             f"along dim 2 (positions 0 .. {end - 1} in order)")
            out = expect_tensor(ctx, out, "out", shape=(b, h, n, d))
            expect_close(ctx, out.float(), want_all[:, :, new],
                         "out vs causal attention over the whole sequence", rtol=1e-4, atol=1e-5)
            start = end


# --- chapter 4: greedy generation with a KV cache --------------------------------------------

GENERATION_CONFIG = GPTConfig(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=3)
#: (prompt length, new tokens)
GENERATION_CASES = [(5, 8), (1, 6), (11, 1), (3, 14)]


class CountingGPT(GPT):
    """A :class:`GPT` that counts its forward calls and the tokens they are fed (batch 1)."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.calls = 0
        self.tokens_fed = 0

    def forward(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        self.calls += 1
        self.tokens_fed += idx.shape[-1]
        return super().forward(idx, cache)


def generation_model(seed: int = 402, config: GPTConfig = GENERATION_CONFIG) -> CountingGPT:
    """The small random model the generation check runs on (seeded, eval mode, float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CountingGPT(config)
        with torch.no_grad():
            # A random GPT with tied embeddings repeats its input token forever, which a loop
            # that forgets the context would get right. Untie lm_head and shrink wte: the greedy
            # tokens then vary and depend on the whole prefix, with top-2 logit gaps > 0.3
            # (no float near-ties for a correct loop to flip).
            model.transformer.wte.weight.mul_(0.5)
            vocab, width = config.vocab_size, config.n_embd
            model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, width) * 2.0)
    return model.eval()


def generation_prompts(seed: int = 403) -> list[tuple[torch.Tensor, int]]:
    """(prompt [1, T], new tokens) for each case of the generation check."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, GENERATION_CONFIG.vocab_size, (1, t), generator=gen), n)
            for t, n in GENERATION_CASES]


@torch.no_grad()
def greedy_and_gap(model: GPT, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """:func:`greedy_without_cache`, and the smallest gap between the two largest logits over
    its greedy steps (read off its last forward pass, which sees every step's prefix)."""
    ids, gap, t = prompt, math.inf, prompt.shape[1]
    for _ in range(new_tokens):
        logits = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    if new_tokens:
        top2 = logits[0, t - 1:].topk(2, dim=-1).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
    return ids, gap


def generation_setup(ctx: Context) -> tuple[CountingGPT, list[tuple[torch.Tensor, int, torch.Tensor]]]:
    """The model and (prompt, new tokens, reference ids) cases of the generation check.

    In hidden mode the model has other sizes and weights, and the prompt / generation lengths
    vary around the visible ones (a one-token prompt or a single new token stays one); a prompt
    whose greedy continuation has a near-tie (top-2 logit gap < 0.1, where a right loop's
    rounding could flip the argmax) is redrawn.
    """
    if not ctx.hidden:
        model = generation_model()
        return model, [(prompt, n, greedy_without_cache(model, prompt, n))
                       for prompt, n in generation_prompts()]
    n_embd, n_head = ctx.pick((48, 3), (32, 2), (48, 4), (64, 4), seed=408)
    config = GPTConfig(vocab_size=ctx.pick(97, 83, 89, 101, 113, seed=406),
                       n_positions=GENERATION_CONFIG.n_positions, n_embd=n_embd,
                       n_layer=ctx.pick(2, 1, 2, seed=407), n_head=n_head)
    model = generation_model(ctx.seed(402), config)
    rng, gen = ctx.rng(405), ctx.generator(403)
    cases = []
    for t, n in GENERATION_CASES:
        t = 1 if t == 1 else rng.randint(max(2, t - 3), t + 3)
        n = 1 if n == 1 else rng.randint(max(2, n - 3), n + 3)
        for _ in range(100):
            prompt = torch.randint(0, config.vocab_size, (1, t), generator=gen)
            want, gap = greedy_and_gap(model, prompt, n)
            if gap > 0.1:
                break
        else:  # pragma: no cover - each draw passes with probability close to 1
            raise RuntimeError("no prompt without near-ties for the hidden generation case")
        cases.append((prompt, n, want))
    return model, cases


@torch.no_grad()
def greedy_without_cache(model: GPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference: recompute the whole sequence for every new token; returns [1, T + n]."""
    ids = prompt
    for _ in range(new_tokens):
        next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@check("greedy generation with a KV cache", POINTS["cached_generation"])
def check_cached_generation(ctx: Context, fn) -> None:
    """``fn(model, prompt_ids, max_new_tokens) -> ids``: greedy decoding with a KV cache.

    ``prompt_ids`` is [1, T]; ``ids`` is [1, T + max_new_tokens], the prompt followed by the
    greedy tokens. The tokens must equal those of a loop that recomputes everything, and the
    model must be fed T + n - 1 tokens in total (the prompt once, then each new token once; one
    more, the last token, is tolerated).
    """
    model, cases = generation_setup(ctx)
    for prompt, n, want in cases:
        t = prompt.shape[1]
        ctx.case = f"random GPT (vocab {model.config.vocab_size}), prompt of {t} tokens, " \
                   f"max_new_tokens={n}"
        model.calls = model.tokens_fed = 0
        with torch.no_grad():
            got = fn(model, prompt.clone(), n)
        got = expect_tensor(ctx, got, "returned ids", shape=(1, t + n))
        if got.is_floating_point() or got.dtype == torch.bool:
            ctx.fail(f"returned ids must be integer token ids, got {got.dtype}")
        if not torch.equal(got[:, :t], prompt):
            ctx.fail("returned ids should start with the prompt (return prompt + new tokens)")
        if not torch.equal(got, want):
            first = int((got != want).nonzero()[0, 1]) - t
            ctx.fail(f"new token {first} is {int(got[0, t + first])}, greedy decoding gives "
                     f"{int(want[0, t + first])} (tokens so far: {want[0, t:t + first].tolist()}); "
                     "is every step feeding the newest token at the right position?")
        needed = t + n - 1
        if model.tokens_fed > needed + 1:
            ctx.fail(f"right tokens, but your loop fed the model {model.tokens_fed} tokens in "
                     f"{model.calls} calls; with a KV cache it needs {needed} (the prompt once, "
                     "then one new token per call): is it recomputing the sequence it has cached?")


# --- chapter 7: speculative decoding, the acceptance / residual step -------------------------


def _bool_value(ctx: Context, value, what: str) -> bool:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            ctx.fail(f"{what} should be one bool, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        ctx.fail(f"{what} should be True or False, got {value!r}")
    return bool(value)


def _token_value(ctx: Context, value, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            ctx.fail(f"{what} should be one integer token id, got a tensor of shape "
                     f"{tuple(value.shape)}, {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.fail(f"{what} should be an integer token id, got {value!r}")
    return value


def _call_step(ctx: Context, fn, p, q, draft: int, generator) -> tuple[bool, int]:
    return _step_result(ctx, fn(p, q, draft, generator), p, draft)


def _step_result(ctx: Context, out, p, draft: int) -> tuple[bool, int]:
    """Check one ``(accepted, token)`` answer for ``draft``."""
    out = unpack_tuple(ctx, out, 2, "accepted, token")
    accepted = _bool_value(ctx, out[0], "accepted")
    token = _token_value(ctx, out[1], "token")
    if not 0 <= token < p.shape[-1]:
        ctx.fail(f"token {token} is not in the vocabulary (0 .. {p.shape[-1] - 1})")
    if accepted and token != draft:
        ctx.fail(f"accepted draft token {draft} but returned token {token}: an accepted draft "
                 "token is the output")
    if not accepted and token == draft:
        ctx.fail(f"rejected draft token {draft} but returned it anyway: after a rejection the "
                 "token comes from norm(max(q - p, 0)), which is 0 at the rejected token "
                 "(a token is only rejected where q < p)")
    return accepted, token


def _probs(*values: float) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    return (t / t.sum()).float()


def _one_hot(index: int, size: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(index), size).float()


#: (label, p, q, draft token, what must happen: "accept", "reject", or "reject -> token")
KNOWN_STEPS = [
    ("draft and target agree (q = p)", _probs(1, 2, 3, 4), _probs(1, 2, 3, 4), 2, "accept"),
    ("q > p at the draft token", _probs(5, 3, 2, 0), _probs(2, 3, 3, 2), 2, "accept"),
    ("q = p at the draft token", _probs(5, 3, 2, 0), _probs(2, 3, 3, 2), 1, "accept"),
    ("q = 0 at the draft token (e.g. cut by the target's top-k)", _probs(5, 3, 2, 0),
     _probs(0, 4, 3, 3), 0, "reject"),
    ("q = 0 at the draft token, and only token 2 has q > p", _probs(6, 4, 0), _probs(0, 4, 6), 0,
     "reject -> 2"),
    ("greedy: p one-hot on 3, q one-hot on 5 (the target disagrees)", _one_hot(3, 8),
     _one_hot(5, 8), 3, "reject -> 5"),
    ("greedy: p and q one-hot on 6 (the target agrees)", _one_hot(6, 8), _one_hot(6, 8), 6,
     "accept"),
]


def _known_steps(ctx: Context, fn, repeats: int = 30) -> None:
    gen = ctx.generator(701)
    for label, p, q, draft, rule in KNOWN_STEPS:
        ctx.case = f"{label}: p = {_fmt(p)}, q = {_fmt(q)}, draft token {draft}"
        for _ in range(repeats):
            p_in, q_in = p.clone(), q.clone()
            accepted, token = _call_step(ctx, fn, p_in, q_in, draft, gen)
            if not (torch.equal(p_in, p) and torch.equal(q_in, q)):
                ctx.fail("your function changed p or q in place; the caller still needs them")
            if rule == "accept" and not accepted:
                ctx.fail(f"the draft token was rejected; q({draft}) >= p({draft}), so "
                         "min(1, q/p) = 1 and it must always be accepted")
            if rule.startswith("reject") and accepted:
                ctx.fail(f"the draft token was accepted; q({draft}) = 0, so min(1, q/p) = 0 and it "
                         "must always be rejected")
            if rule.startswith("reject") and q[token] == 0:
                ctx.fail(f"after the rejection you returned token {token}, which the target gives "
                         "probability 0; resample from norm(max(q - p, 0))")
            if rule.startswith("reject ->") and token != int(rule.split()[-1]):
                ctx.fail(f"after the rejection you returned token {token}; max(q - p, 0) = "
                         f"{_fmt((q - p).clamp(min=0))} is non-zero only at token "
                         f"{rule.split()[-1]}, so that is the only possible resample (sampling "
                         "from q instead of the residual would also return tokens the draft "
                         "already had its chance to propose)")


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in t.tolist()) + "]"


def _statistical_pairs(ctx: Context | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, p, q): a generic pair, truncated supports on either side, a close pair; over 8
    tokens for the visible cases.

    In hidden mode the vocabulary has 6, 7, 9 or 10 tokens, the truncated supports are drawn
    too, and a pair is redrawn until it is as easy to test as the visible ones: every token q
    allows has q >= 0.1 / vocab (>= 200 expected counts, where the chi-square approximation is
    sound), p >= 0.05 / vocab where p > 0, 0.3 <= alpha <= 0.95 (alpha >= 0.8 for the close
    pair), and the tokens only the residual can produce have q >= 0.5 / vocab.
    """
    ctx = ctx if ctx is not None else Context()
    gen = ctx.generator(702)
    vocab = ctx.pick(8, 6, 7, 9, 10, seed=704)
    if ctx.hidden:
        rng = ctx.rng(705)
        q_zero = sorted(rng.sample(range(vocab), rng.randint(2, vocab // 2)))
        p_zero = sorted(rng.sample(range(vocab), 2))
    else:
        q_zero, p_zero = [1, 4, 6], [0, 5]

    def softmax(scale: float, mask: list[int] = ()) -> torch.Tensor:
        logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * scale
        logits[list(mask)] = float("-inf")
        return torch.softmax(logits, 0).float()

    def close_pair() -> tuple[torch.Tensor, torch.Tensor]:
        base = softmax(1.0)
        close = torch.softmax(torch.log(base.double()) + 0.3 * torch.randn(vocab, generator=gen,
                                                                          dtype=torch.float64), 0)
        return base, close.float()

    makers = [
        ("random p and q", lambda: (softmax(1.2), softmax(1.2))),
        (f"q is 0 on {len(q_zero)} tokens (target top-k = {vocab - len(q_zero)})",
         lambda: (softmax(1.0), softmax(1.0, q_zero))),
        (f"p is 0 on {len(p_zero)} tokens the target likes (they come only from the residual)",
         lambda: (softmax(1.0, p_zero), softmax(0.8))),
        ("p close to q (most drafts accepted)", close_pair),
    ]
    close = close_pair()  # drawn first: the visible pairs keep the values they always had
    pairs = [make() for _, make in makers[:3]] + [close]

    def comparable(i: int, p: torch.Tensor, q: torch.Tensor) -> bool:
        alpha = float(torch.minimum(p, q).sum())
        return (float(q[q > 0].min()) >= 0.1 / vocab and float(p[p > 0].min()) >= 0.05 / vocab
                and (0.8 if i == 3 else 0.3) <= alpha <= 0.95
                and (i != 2 or float(q[p_zero].min()) >= 0.5 / vocab))

    if ctx.hidden:
        for i, (_, make) in enumerate(makers):
            for _ in range(1000):
                if comparable(i, *pairs[i]):
                    break
                pairs[i] = make()
            else:  # pragma: no cover - a draw passes with probability well above 1 / 10
                raise RuntimeError(f"no comparable hidden pair for {makers[i][0]!r}")
    return [(label, p, q) for (label, _), (p, q) in zip(makers, pairs, strict=True)]


def chi_square_p_value(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularised upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def sample_accept_or_resample(ctx: Context, fn, p: torch.Tensor, q: torch.Tensor, n: int,
                              seed: int) -> tuple[torch.Tensor, int]:
    """Draw ``n`` draft tokens from p, pass each through ``fn``: (counts of output tokens, accepted)."""
    gen = ctx.generator(seed)
    drafts = torch.multinomial(p.double(), n, replacement=True, generator=gen).tolist()
    fn_gen = ctx.generator(seed + 1)
    p_in, q_in = p.clone(), q.clone()
    counts = [0] * p.shape[0]
    accepted_total = 0
    answers = call_many(fn, [(p_in, q_in, draft, fn_gen) for draft in drafts])
    for draft, out in zip(drafts, answers, strict=False):
        accepted, token = _step_result(ctx, out, p_in, draft)
        counts[token] += 1
        accepted_total += accepted
    if not (torch.equal(p_in, p) and torch.equal(q_in, q)):
        ctx.fail("your function changed p or q in place; the caller still needs them")
    return torch.tensor(counts, dtype=torch.float64), accepted_total


def goodness_of_fit(counts: torch.Tensor, accepted: int, p: torch.Tensor,
                    q: torch.Tensor) -> dict[str, float]:
    """Chi-square statistics and p-values: output tokens vs q, acceptance count vs alpha."""
    n = float(counts.sum())
    q = q.double()
    support = q > 0
    expected = n * q[support]
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    alpha = float(torch.minimum(p.double(), q).sum())
    mean, var = n * alpha, n * alpha * (1 - alpha)
    accept_stat = (accepted - mean) ** 2 / var if var > 0 else (0.0 if accepted == mean else math.inf)
    return {
        "n": n, "statistic": stat, "dof": dof, "p_value": chi_square_p_value(stat, dof),
        "outside_support": float(counts[~support].sum()),
        "alpha": alpha, "accept_rate": accepted / n, "accept_statistic": accept_stat,
        "accept_p_value": chi_square_p_value(accept_stat, 1) if math.isfinite(accept_stat) else 0.0,
    }


def _statistical(ctx: Context, fn, n: int) -> None:
    pairs = _statistical_pairs(ctx)
    threshold = P_VALUE_THRESHOLD / (2 * len(pairs))  # Bonferroni over 2 tests per pair
    for i, (label, p, q) in enumerate(pairs):
        ctx.case = f"statistical test, {label}: p = {_fmt(p)}, q = {_fmt(q)}, {n} draft tokens ~ p"
        counts, accepted = sample_accept_or_resample(ctx, fn, p, q, n, seed=710 + 2 * i)
        fit = goodness_of_fit(counts, accepted, p, q)
        if fit["outside_support"]:
            bad = [j for j in range(len(q)) if q[j] == 0 and counts[j] > 0]
            ctx.fail(f"returned token(s) {bad}, which the target gives probability 0")
        if fit["p_value"] < threshold:
            freq = counts / counts.sum()
            ctx.fail(f"the returned tokens are not distributed as q: frequencies {_fmt(freq)}, "
                     f"chi-square {fit['statistic']:.1f} with {fit['dof']} degrees of freedom, "
                     f"p-value {fit['p_value']:.2g} < {threshold:.2g}")
        if fit["accept_p_value"] < threshold:
            ctx.fail(f"accepted {fit['accept_rate']:.3f} of the draft tokens; min(1, q/p) accepts "
                     f"alpha = sum(min(p, q)) = {fit['alpha']:.3f} of them on average "
                     f"(p-value {fit['accept_p_value']:.2g})")


def _uses_generator(ctx: Context, fn) -> None:
    ctx.case = "reproducibility: two generators with the same seed"
    p, q = _probs(4, 3, 2, 1, 0), _probs(1, 1, 3, 2, 3)
    runs = []
    for global_seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            gen = ctx.generator(703)
            calls = [(p.clone(), q.clone(), d % 4, gen) for d in range(60)]
            runs.append([_step_result(ctx, out, p, d % 4)
                         for d, out in zip(range(60), call_many(fn, calls), strict=False)])
    if runs[0] != runs[1]:
        ctx.fail("the results differ: draw every random number from the generator you are given, "
                 "e.g. torch.rand((), generator=generator) and "
                 "torch.multinomial(..., generator=generator)")


@check("accept or resample (speculative decoding)", POINTS["accept_or_resample"])
def check_accept_or_resample(ctx: Context, fn) -> None:
    """``fn(p, q, draft_token, generator) -> (accepted, token)`` for one drafted position.

    ``p`` (draft) and ``q`` (target) are float probability vectors [vocab]; ``draft_token`` is an
    int drawn from p. Accept with probability min(1, q[x] / p[x]) and return ``(True, x)``;
    otherwise return ``(False, y)`` with y drawn from norm(max(q - p, 0)). Every random number
    comes from ``generator``. Checked on known cases, for reproducibility (two generators
    seeded alike give the same results), then statistically: over
    :data:`STATISTICAL_SAMPLES` drafts per (p, q) pair the output must follow q (chi-square
    test) and the acceptance rate must be sum(min(p, q)), at a family-wise p-value threshold
    of :data:`P_VALUE_THRESHOLD`.
    """
    _known_steps(ctx, fn)
    _uses_generator(ctx, fn)
    _statistical(ctx, fn, STATISTICAL_SAMPLES)


# --- chapter 7: the expected speed-up --------------------------------------------------------

#: (alpha, k, c, expected speed-up, note)
SPEEDUP_CASES = [
    (0.8, 4, 0.05, (1 - 0.8**5) / (0.2 * 1.2), ""),
    (0.6, 1, 0.0, 1.6, " (a free draft, one token drafted)"),
    (0.9, 8, 0.2, (1 - 0.9**9) / (0.1 * 2.6), ""),
    (0.0, 3, 0.1, 1 / 1.3, " (nothing accepted: speculation is slower than plain decoding)"),
    (1.0, 4, 0.1, 5 / 1.4, " (everything accepted: the formula is 0/0 here; take its limit, "
                           "(k + 1) / (k c + 1))"),
    (0.5, 0, 0.3, 1.0, " (k = 0: no draft, plain decoding)"),
]


def _speedup(alpha: float, k: int, c: float) -> float:
    tokens = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + 1)


def speedup_cases(ctx: Context) -> list[tuple[float, int, float, float, str]]:
    """:data:`SPEEDUP_CASES`, or in hidden mode the same kinds of case (generic, free draft,
    long draft, alpha = 0, alpha = 1, k = 0) with other alpha, k and c."""
    if not ctx.hidden:
        return SPEEDUP_CASES
    rng = ctx.rng(706)

    def uniform(lo: float, hi: float, digits: int = 2) -> float:
        return round(rng.uniform(lo, hi), digits)

    cases = [(uniform(0.5, 0.95), rng.randint(2, 7), uniform(0.01, 0.3, 3)),
             (uniform(0.3, 0.9), 1, 0.0),
             (uniform(0.8, 0.97), rng.randint(6, 12), uniform(0.1, 0.4)),
             (0.0, rng.randint(1, 6), uniform(0.05, 0.4)),
             (1.0, rng.randint(2, 8), uniform(0.05, 0.3)),
             (uniform(0.1, 0.9), 0, uniform(0.05, 0.5))]
    notes = [note for *_, note in SPEEDUP_CASES]
    return [(alpha, k, c, _speedup(alpha, k, c), note)
            for (alpha, k, c), note in zip(cases, notes, strict=True)]


@check("expected speed-up", POINTS["expected_speedup"])
def check_expected_speedup(ctx: Context, fn) -> None:
    """``fn(alpha, k, c) -> float``: (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), limit at alpha = 1."""
    for alpha, k, c, want, note in speedup_cases(ctx):
        ctx.case = f"alpha={alpha}, k={k}, c={c}"
        got = fn(alpha, k, c)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            ctx.fail(f"expected a number, got {type(got).__name__}")
        if not math.isfinite(got) or abs(got - want) > 1e-6 * abs(want):
            ctx.fail(f"expected {want:.6g}{note}, got {got:.6g}")
