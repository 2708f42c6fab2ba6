"""Perplexity under the two protocols quantization papers and HF quote.

Perplexity is exp(mean negative log-likelihood per predicted token). Models have a finite
context, so a long text is cut into windows, and *how* it is cut changes the number:

- ``"stride"`` (HF's guide, "Perplexity of fixed-length models"): windows of ``max_length``
  tokens moved ``stride`` tokens at a time; each window scores only the tokens the previous
  one did not. With a stride below the window, every token after the first is scored exactly
  once, with at least ``max_length - stride`` tokens of context; with ``stride == max_length``
  the windows do not overlap and a window's first token, having no context, is not scored.
- ``"gptq"`` (the GPTQ / AWQ papers): the text cut into ``len // seqlen`` non-overlapping
  windows (the tail is dropped), every window scored on its own. Tokens at the start of a
  window see little context, so this reads higher than the stride protocol.

Both work for HF models (which return ``.logits``) and for ``course_lib.models.gpt.GPT`` (which
returns the logits tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_lib.models.families import context_length

PROTOCOLS = ("stride", "gptq")


@dataclass
class PerplexityResult:
    """Perplexity with what it was computed from (so a number can be checked and compared)."""

    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # tokens scored
    n_windows: int
    protocol: str
    max_length: int
    stride: int

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.3f} ({self.protocol} protocol, {self.n_tokens:,} tokens, "
                f"{self.n_windows} windows of {self.max_length}, stride {self.stride})")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _context_length(model) -> int:
    return context_length(model.config)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D tensor; empty text is an error."""
    if not text or not text.strip():
        raise ValueError("perplexity needs non-empty text; got an empty string")
    # The tokenizer may warn that the text is longer than the model's context: we window it.
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; the text has {ids.numel()}")
    return ids


@torch.no_grad()
def perplexity(model, tokenizer=None, text: str | None = None, *, ids: torch.Tensor | None = None,
               protocol: str = "stride", max_length: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (tokenised by ``tokenizer``) or on token ``ids``.

    ``max_length`` defaults to the model's context; ``stride`` (stride protocol only) defaults to
    ``max_length`` (no overlap) and must be in [1, max_length]. ``max_tokens`` keeps only the
    first tokens of the text (fast mode). ``batch_size`` windows run together (gptq protocol).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if ids is None:
        if tokenizer is None or text is None:
            raise ValueError("pass either `ids` or both `tokenizer` and `text`")
        ids = encode(tokenizer, text)
    ids = ids.flatten()
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; got {ids.numel()}")
    context = _context_length(model)
    max_length = max_length or context
    if not 2 <= max_length <= context:
        raise ValueError(f"max_length must be in [2, {context}] (the model's context), got {max_length}")
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    ids = ids.to(_device(model))
    if protocol == "stride":
        nll_sum, n_tokens, n_windows = _stride_nll(model, ids, max_length, stride, progress)
    else:
        nll_sum, n_tokens, n_windows = _window_nll(model, ids, max_length, batch_size, progress)
        stride = max_length
    nll = nll_sum / n_tokens
    return PerplexityResult(math.exp(nll), nll, n_tokens, n_windows, protocol, max_length, stride)


def _stride_nll(model, ids, max_length, stride, progress) -> tuple[float, int, int]:
    """HF's sliding-window protocol: each token is scored at most once, by the first window
    that holds it with at least one token of context before it."""
    n = ids.numel()
    starts = list(range(0, n, stride))
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in tqdm(starts, desc="perplexity (stride)", disable=not progress, leave=False):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1)  # first token this window scores (needs one of context)
        if first < end:
            logits = _logits(model, ids[begin:end][None])[0]
            # logits at position p predict token p + 1
            pred = logits[first - begin - 1 : end - begin - 1]
            nll_sum += F.cross_entropy(pred, ids[first:end], reduction="sum").item()
            n_tokens += end - first
            windows += 1
        prev_end = end
        if end == n:
            break
    return nll_sum, n_tokens, windows


def _window_nll(model, ids, seqlen, batch_size, progress) -> tuple[float, int, int]:
    """GPTQ's protocol: ``len // seqlen`` non-overlapping windows, each scored on its own."""
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the gptq protocol needs at least one window of {seqlen} tokens; "
                         f"the text has {ids.numel()} (lower max_length or give more text)")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    nll_sum = 0.0
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity (gptq)", disable=not progress, leave=False):
        batch = windows[i : i + batch_size]
        logits = _logits(model, batch)
        nll_sum += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    return nll_sum, n_windows * (seqlen - 1), n_windows
