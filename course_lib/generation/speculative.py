"""Speculative decoding (chapter 7): a small draft model guesses, the target checks in one pass.

One round, for batch 1 (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "speculative sampling"):

1. the draft proposes ``k`` tokens d_1..d_k one at a time with its KV cache, sampling each from
   its own distribution p_i (same temperature / top-k / top-p as the target);
2. the target scores all k + 1 positions in ONE forward pass over the k new tokens, giving
   q_1..q_{k+1};
3. token d_i is accepted with probability min(1, q_i(d_i) / p_i(d_i)); at the first rejection
   the round ends with a token drawn from norm(max(q_i - p_i, 0)) (:func:`residual_distribution`);
   if all k are accepted, a bonus token comes from q_{k+1}. So one target call yields 1..k+1
   tokens, and every token is distributed exactly as the target would have sampled it;
4. both caches roll back to the accepted length.

Greedy decoding (``temperature=0``) is the same code path: :func:`logits_to_probs` makes p and q
one-hot, so min(1, q/p) accepts d_i exactly when it is the target's argmax, and the residual is
one-hot on that argmax. The output equals the target's own greedy decode (up to exact float
ties: the target scores k + 1 tokens in one matmul, which rounds differently from one-token
steps; a flip needs two logits equal to ~1e-6).

Notation: p = draft, q = target, as in the course's design notes. Differences from the chapter's
``SpeculativeDecoder`` sketch, which is not exact as printed: its draft picks ``argmax`` but
accepts with the *softmax* p (an exact rule needs the token drawn from the same p that enters
q/p); it recomputes the whole sequence on every call (no KV cache, no rollback); and it can
overshoot ``max_length``. Here the last round drafts ``min(k, remaining - 1)`` tokens, so
``generate`` returns exactly ``max_new_tokens`` tokens and never exceeds the context.

Cache invariant (what :class:`SpeculativeResult` lets tests check): each model's KV cache always
holds an exact prefix of the current sequence, and the uncached tail is that model's next input.
After every round the target has cached ``len(sequence) - 1`` positions (all but the token just
produced); the draft has cached ``len(sequence) - 1``, or ``len(sequence) - 2`` after a round
that accepted all its tokens (it never ran on d_k; it catches up by reading the two-token tail in
the first draft call of the next round, so no extra draft call is spent). The first round's
inputs are the whole prompt (prefill and verification in one call). A final round with room for
one token only drafts nothing (one target call), leaving the draft one more token behind.

Both families and both implementations work, as target or draft in any mix: the course's
:class:`course_lib.models.gpt.GPT` and :class:`course_lib.models.llama.Llama`
(``ContiguousKVCache.truncate``), and HF GPT-2 / LLaMA-family causal LMs (``DynamicCache.crop``).
Nothing depends on how positions are encoded: a learned table (GPT-2) or rotary angles (LLaMA)
are both computed from the cache's length, so rolling the cache back also rolls the positions
back. Target and draft need one tokenizer (checked through ``vocab_size``, and the tokenizers'
vocabularies when given), e.g. SmolLM2-360M with SmolLM2-135M
(:func:`course_lib.models.hub.speculative_pair`). No EOS stopping: it generates exactly
``max_new_tokens`` tokens, as the chapter's loops do.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from course_lib.evaluation.speed import median_seconds
from course_lib.generation.generate import hf_cache_kwarg
from course_lib.generation.sampling import check_sampling_args, logits_to_probs, sample
from course_lib.models.families import context_length

ADAPTIVE_MODES = (None, "chapter", "hf")


# --------------------------------------------------------------------------------------------
# The theory: expected tokens per target call and expected speed-up (Leviathan et al., §3.4).
# --------------------------------------------------------------------------------------------

def _check_alpha_k(alpha: float, k: int) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (acceptance rate) must be in [0, 1], got {alpha!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens one target call yields: (1 - alpha^(k+1)) / (1 - alpha); k + 1 at alpha = 1.

    Assumes each drafted token is accepted independently with probability ``alpha``.
    """
    _check_alpha_k(alpha, k)
    if alpha == 1:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, c: float, verify_cost: float = 1.0) -> float:
    """Expected speed-up over target-only decoding: (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)).

    ``c`` is the cost ratio (one draft step's time / one target step's time). The paper assumes
    the target scores k + 1 tokens as fast as one (memory-bound decoding); ``verify_cost`` is
    that pass's time in target steps when it is not (see :func:`measure_verify_cost`): the
    denominator becomes k c + verify_cost. At alpha = 0 it is 1 / (k c + 1).
    """
    if c < 0:
        raise ValueError(f"c (draft/target cost ratio) must be >= 0, got {c!r}")
    if verify_cost <= 0:
        raise ValueError(f"verify_cost must be > 0, got {verify_cost!r}")
    return expected_tokens_per_round(alpha, k) / (k * c + verify_cost)


# --------------------------------------------------------------------------------------------
# The exact rule: accept with min(1, q/p), else resample from norm(max(q - p, 0)).
# --------------------------------------------------------------------------------------------

def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(q - p, 0)) over the last dim: where to sample after a rejection.

    Rejection has probability sum(max(p - q, 0)) = sum(max(q - p, 0)); when that is 0
    (p == q) rejection cannot happen, and q is returned so the result is still a distribution.
    """
    residual = (q - p).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-30), q)


def acceptance_mask(p_token: torch.Tensor, q_token: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """True where a drafted token is accepted: u < q/p with u ~ U[0, 1), i.e. prob min(1, q/p).

    Written as ``u * p < q``: no division, and q = 0 is never accepted (greedy mismatch).
    """
    u = torch.rand(p_token.shape, generator=generator, device=p_token.device)
    return u * p_token < q_token


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification step, batched over leading dims: ``(accepted, token_out)``.

    ``p``, ``q``: draft and target distributions [..., vocab]; ``token`` [...]: the draft's
    token, drawn from ``p``. Accepted with probability min(1, q/p); otherwise ``token_out`` is
    drawn from :func:`residual_distribution`. If ``token ~ p`` then ``token_out ~ q`` exactly.
    """
    index = token.unsqueeze(-1)
    accepted = acceptance_mask(p.gather(-1, index).squeeze(-1), q.gather(-1, index).squeeze(-1),
                               generator)
    resampled = sample(residual_distribution(p, q), generator)
    return accepted, torch.where(accepted, token, resampled)


# --------------------------------------------------------------------------------------------
# Draft length schedules: fixed, the chapter's adaptive rule, Hugging Face's heuristic.
# --------------------------------------------------------------------------------------------

@dataclass
class FixedK:
    """Always draft ``k`` tokens."""

    k: int

    def update(self, k_used: int, accepted: int) -> None:
        pass


@dataclass
class ChapterAdaptiveK:
    """The chapter's ``AdaptiveSpeculativeDecoder.adjust_k`` (section 进阶：自适应投机采样).

    Record each round's acceptance ``accepted / k``; every ``period`` rounds, once ``window``
    rounds are recorded, look at the mean of the last ``window``: above ``high`` (0.8) draft one
    more token (at most ``k_max`` = 8), below ``low`` (0.4) one fewer (at least ``k_min`` = 2).
    The chapter starts at k = 4.

    Corrected: the chapter adjusts "when ``len(tokens) % 10 == 0``", which depends on how many
    tokens the rounds happened to yield (it may fire twice in a row or skip for long stretches);
    it means "every 10 rounds", which is what this does. Its state also persisted across
    ``generate`` calls; here each call starts afresh. A caveat it does not mention: accepted / k
    is not the per-token acceptance alpha (tokens after a rejection are never checked), e.g. at
    alpha = 0.9 and k = 4 it is 0.77 < 0.8, so k stays put where a longer draft would pay.
    """

    k: int = 4
    k_min: int = 2
    k_max: int = 8
    window: int = 10
    period: int = 10
    high: float = 0.8
    low: float = 0.4
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.k_min <= self.k <= self.k_max:
            raise ValueError(f"k must be in [{self.k_min}, {self.k_max}] for the chapter's adaptive "
                             f"rule, got {self.k}")

    def update(self, k_used: int, accepted: int) -> None:
        if k_used == 0:  # a last round that drafted nothing tells nothing
            return
        self.history.append(accepted / k_used)
        if len(self.history) >= self.window and len(self.history) % self.period == 0:
            rate = sum(self.history[-self.window:]) / self.window
            if rate > self.high:
                self.k = min(self.k_max, self.k + 1)
            elif rate < self.low:
                self.k = max(self.k_min, self.k - 1)


@dataclass
class HFHeuristicK:
    """Hugging Face assisted generation's ``num_assistant_tokens_schedule="heuristic"``.

    All drafted tokens accepted: k += 2; otherwise k -= 1, never below 1 (no upper bound, as in
    transformers' ``AssistedCandidateGenerator.update_candidate_strategy``).
    """

    k: int

    def update(self, k_used: int, accepted: int) -> None:
        if k_used == 0:
            return
        self.k = self.k + 2 if accepted == k_used else max(1, self.k - 1)


def make_schedule(adaptive: str | None, k: int) -> FixedK | ChapterAdaptiveK | HFHeuristicK:
    """A fresh draft-length schedule: ``None`` (fixed k), ``"chapter"`` or ``"hf"``."""
    if adaptive is None:
        return FixedK(k)
    if adaptive == "chapter":
        return ChapterAdaptiveK(k)
    if adaptive == "hf":
        return HFHeuristicK(k)
    raise ValueError(f"adaptive must be one of {ADAPTIVE_MODES}, got {adaptive!r}")


# --------------------------------------------------------------------------------------------
# One interface over our GPT / Llama (ContiguousKVCache) and HF models (DynamicCache).
# --------------------------------------------------------------------------------------------

class _CachedModel:
    """Feed tokens, get logits [1, T, vocab]; ``length`` cached positions; ``truncate`` rolls back."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        self.model = model
        self.ours = hasattr(model, "new_cache")  # course_lib.models: GPT or Llama
        if self.ours:
            self.cache = model.new_cache(1, max_len)
        else:
            self.cache = None
            self.key = hf_cache_kwarg(model)

    @property
    def length(self) -> int:
        if self.ours:
            return self.cache.length
        if self.cache is None:
            return 0
        if hasattr(self.cache, "get_seq_length"):
            return self.cache.get_seq_length()
        return self.cache[0][0].shape[-2]  # legacy tuple of (key, value) per layer

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ours:
            return self.model(ids, self.cache)
        out = self.model(ids, use_cache=True, **{self.key: self.cache})
        self.cache = out[self.key]
        return out.logits

    def truncate(self, length: int) -> None:
        drop = self.length - length
        if drop < 0:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if drop == 0:
            return
        if self.ours:
            self.cache.truncate(length)
        elif hasattr(self.cache, "crop"):
            # a negative argument means "remove that many" in transformers 4.x and 5.x alike
            # (5.x refuses a positive one; 4.x read it as the length to keep)
            self.cache.crop(-drop)
        else:
            self.cache = tuple((k[..., :length, :], v[..., :length, :]) for k, v in self.cache)


def _config(model: torch.nn.Module):
    return model.config


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class SpeculativeStats:
    """What happened in one ``generate`` call, round by round (a round = one target call)."""

    k_per_round: list[int] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)
    draft_calls: int = 0
    target_calls: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.k_per_round)

    @property
    def drafted(self) -> int:
        return sum(self.k_per_round)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_round)

    @property
    def checked(self) -> int:
        """Drafted tokens the rule actually tested: the accepted ones plus each first rejection."""
        return sum(n + (n < k) for k, n in zip(self.k_per_round, self.accepted_per_round, strict=True))

    @property
    def acceptance_rate(self) -> float:
        """alpha, the per-token acceptance probability: accepted / checked (its estimate under
        independent acceptances). accepted / drafted is lower: tokens after a rejection are
        never checked."""
        return self.accepted / self.checked if self.checked else float("nan")

    @property
    def draft_acceptance(self) -> float:
        """accepted / drafted (what the chapter's adaptive rule records per round)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")

    @property
    def mean_k(self) -> float:
        return self.drafted / self.rounds if self.rounds else float("nan")

    def accepted_histogram(self) -> dict[int, int]:
        """{accepted tokens in a round: number of rounds}."""
        return dict(sorted(Counter(self.accepted_per_round).items()))

    def summary(self) -> dict:
        return {
            "new_tokens": self.new_tokens, "seconds": self.seconds,
            "target_calls": self.target_calls, "draft_calls": self.draft_calls,
            "acceptance_rate": self.acceptance_rate, "draft_acceptance": self.draft_acceptance,
            "tokens_per_target_call": self.tokens_per_target_call, "mean_k": self.mean_k,
            "accepted_histogram": self.accepted_histogram(),
        }


@dataclass
class SpeculativeResult:
    """``tokens``: the generated ids [1, max_new_tokens]; ``sequence``: prompt + tokens.

    ``target_cache`` / ``draft_cache`` are the models' caches at the end (see the module's cache
    invariant), kept so that it can be checked.
    """

    tokens: torch.Tensor
    sequence: torch.Tensor
    stats: SpeculativeStats
    target_cache: object = None
    draft_cache: object = None
    target_cache_length: int = 0
    draft_cache_length: int = 0


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------

class SpeculativeDecoder:
    """Speculative decoding of ``target`` with ``draft`` (batch 1; GPT-2 or LLaMA, ours or HF).

    ``k``: tokens drafted per round (the starting value when ``adaptive`` is ``"chapter"``,
    which keeps k in [2, 8], or ``"hf"``: see :class:`ChapterAdaptiveK`, :class:`HFHeuristicK`).
    ``temperature`` / ``top_k`` / ``top_p`` apply to draft and target alike through
    :func:`logits_to_probs`; ``temperature=0`` is greedy. Tokenizers, when given, must match.
    """

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, k: int = 4,
                 adaptive: str | None = None, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, target_tokenizer=None, draft_tokenizer=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (tokens drafted per round) must be an integer >= 1, got {k!r}")
        make_schedule(adaptive, k)  # validates adaptive (and k's range for "chapter")
        check_sampling_args(temperature, top_k, top_p)
        tv, dv = _config(target).vocab_size, _config(draft).vocab_size
        if tv != dv:
            raise ValueError(f"draft vocab_size ({dv}) differs from the target's ({tv}); "
                             "speculative decoding needs one shared tokenizer")
        if target_tokenizer is not None and draft_tokenizer is not None:
            if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
                raise ValueError("draft_tokenizer's vocabulary differs from target_tokenizer's; "
                                 "speculative decoding needs one shared tokenizer")
        if _device(target) != _device(draft):
            raise ValueError(f"draft is on {_device(draft)} but target on {_device(target)}; "
                             "put both on the same device")
        self.target, self.draft, self.k, self.adaptive = target, draft, k, adaptive
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.context = min(context_length(_config(target)), context_length(_config(draft)))

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits_to_probs(logits, self.temperature, self.top_k, self.top_p)

    def _draw(self, probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # argmax of a one-hot distribution is what `sample` would return; skip the random race
        return probs.argmax(-1) if self.temperature == 0 else sample(probs, generator)

    def _check_prompt(self, prompt_ids, max_new_tokens: int) -> torch.Tensor:
        prompt = torch.as_tensor(prompt_ids)
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"prompt_ids must have shape [1, length] (batch 1 only), got "
                             f"{tuple(prompt.shape)}")
        if prompt.shape[1] < 1 or prompt.dtype not in (torch.int64, torch.int32):
            raise ValueError("prompt_ids must be a non-empty tensor of integer token ids")
        vocab = _config(self.target).vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ValueError(f"prompt_ids must lie in [0, {vocab}), the vocabulary")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if prompt.shape[1] + max_new_tokens > self.context:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} with a {prompt.shape[1]}-token prompt exceeds "
                f"the context of {self.context} tokens; at most {self.context - prompt.shape[1]}")
        return prompt.to(device=_device(self.target), dtype=torch.long)

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens: int,
                 generator: torch.Generator | None = None) -> SpeculativeResult:
        """Generate exactly ``max_new_tokens`` tokens after ``prompt_ids`` ([1, P] or [P])."""
        prompt = self._check_prompt(prompt_ids, max_new_tokens)
        P, N = prompt.shape[1], max_new_tokens
        schedule = make_schedule(self.adaptive, self.k)
        target, draft = _CachedModel(self.target, P + N), _CachedModel(self.draft, P + N)
        seq = torch.zeros(1, P + N, dtype=torch.long, device=prompt.device)
        seq[:, :P] = prompt
        length = P  # tokens of seq that are final
        stats = SpeculativeStats()
        start = time.perf_counter()
        while length < P + N:
            k = min(schedule.k, P + N - length - 1)  # the round yields at most k + 1 tokens
            # 1. draft k tokens; its first input is everything it has not cached yet
            p_rows = []
            x = seq[:, draft.length:length]
            for i in range(k):
                p_i = self._probs(draft(x)[:, -1])  # [1, vocab]
                seq[:, length + i] = self._draw(p_i, generator)
                p_rows.append(p_i)
                x = seq[:, length + i:length + i + 1]
            # 2. the target scores the k drafted tokens and the one after them in one pass
            q = self._probs(target(seq[:, target.length:length + k])[0, -(k + 1):])  # [k+1, V]
            # 3. accept d_i with prob min(1, q_i/p_i) up to the first rejection
            n, p = k, None
            if k:
                p = torch.cat(p_rows)  # [k, vocab]
                drafted = seq[0, length:length + k]
                rows = torch.arange(k, device=seq.device)
                ok = acceptance_mask(p[rows, drafted], q[rows, drafted], generator)
                n = int(ok.int().cumprod(0).sum())  # one host sync per round
            # ... then one more token: from the residual at the rejection, or the bonus from q_{k+1}
            last = residual_distribution(p[n], q[n]) if n < k else q[k]
            seq[:, length + n] = self._draw(last, generator)
            length += n + 1
            # 4. roll back: keep only positions of final tokens (all but the newest one)
            target.truncate(length - 1)
            draft.truncate(min(draft.length, length - 1))
            stats.k_per_round.append(k)
            stats.accepted_per_round.append(n)
            stats.draft_calls += k
            stats.target_calls += 1
            schedule.update(k, n)
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = N
        return SpeculativeResult(seq[:, P:].clone(), seq, stats, target.cache, draft.cache,
                                 target.length, draft.length)


# --------------------------------------------------------------------------------------------
# Measuring the cost ratio c
# --------------------------------------------------------------------------------------------

@torch.inference_mode()
def forward_seconds(model: torch.nn.Module, tokens: int = 1, prompt_len: int = 32,
                    calls: int = 16, repeats: int = 3) -> float:
    """Median seconds of one cached forward pass over ``tokens`` new tokens (batch 1) after a
    ``prompt_len``-token prefix, rolled back after each call: ``tokens=1`` is a decode step,
    ``tokens=k + 1`` a verification."""
    device = _device(model)
    gen = torch.Generator(device).manual_seed(0)
    vocab = _config(model).vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), device=device, generator=gen)
    new = torch.randint(0, vocab, (1, tokens), device=device, generator=gen)
    runner = _CachedModel(model, prompt_len + tokens)
    runner(prompt)

    def run():
        for _ in range(calls):
            runner(new)
            runner.truncate(prompt_len)

    return median_seconds(run, repeats, device) / calls


def measure_cost_ratio(target: torch.nn.Module, draft: torch.nn.Module, prompt_len: int = 32,
                       calls: int = 16, repeats: int = 3) -> float:
    """c = one draft decode step's time / one target decode step's time, measured here."""
    return (forward_seconds(draft, 1, prompt_len, calls, repeats)
            / forward_seconds(target, 1, prompt_len, calls, repeats))


def measure_verify_cost(target: torch.nn.Module, k: int, prompt_len: int = 32, calls: int = 16,
                        repeats: int = 3) -> float:
    """Time of the target's (k + 1)-token verification pass / time of one decode step.

    The speed-up formula assumes 1 (decoding is memory-bound, so k + 1 tokens cost what one
    does), which holds for big models on a GPU; a small model on a CPU can cost more.
    """
    return (forward_seconds(target, k + 1, prompt_len, calls, repeats)
            / forward_seconds(target, 1, prompt_len, calls, repeats))
