"""From logits to the next token: temperature, top-k, top-p, and seeded sampling.

Every generator in the course (the plain loops of chapter 4, the speculative decoder of
chapter 7, the serving engine) turns logits into probabilities with the one function
:func:`logits_to_probs`, so that "the target's distribution" means the same thing everywhere —
speculative decoding is exact only if draft and target probabilities are computed by the same
rule. The order is Hugging Face's: temperature, then top-k, then top-p.

``temperature == 0`` means greedy: the distribution is one-hot on the argmax.

:func:`sample` draws with the exponential-race trick (``argmax(p / E)`` with ``E ~ Exp(1)``,
as gpt-fast does), which selects index i with probability p_i and, unlike
``torch.multinomial``, never waits for the GPU to hand a value back to Python.
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None) -> None:
    """Raise a ValueError naming the argument when a sampling setting is out of range."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Probabilities (float32, same shape as ``logits`` [..., vocab]) after the sampling rules."""
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``probs`` [..., vocab] -> LongTensor [...]; no host sync."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / race, dim=-1)


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token for each row of ``logits`` [..., vocab]: argmax when greedy, else a sample."""
    if temperature == 0:
        check_sampling_args(temperature, top_k, top_p)
        return logits.argmax(-1)
    return sample(logits_to_probs(logits, temperature, top_k, top_p), generator)
