"""Autoregressive generation with and without a KV cache (chapter 4), and what each one costs.

A causal language model produces one token per forward pass. The chapter's two loops:

- :func:`generate_no_cache` feeds the *whole* sequence (prompt + tokens so far) at every step
  and keeps only the last position's logits. Every step recomputes the keys and values of all
  earlier positions, although in a causal model they cannot change: position i only ever sees
  positions <= i, so appending a token changes nothing before it.
- :func:`generate_with_cache` runs the prompt once (*prefill*), keeps each layer's keys and
  values, and then feeds one token per step (*decode*), attending to the cached keys/values.

Both take the next token with :func:`course_lib.generation.sampling.next_token` (greedy at
``temperature=0``), so with the same ``generator`` they produce the same tokens up to float
noise. Both work for :class:`course_lib.models.gpt.GPT` (its :class:`ContiguousKVCache`) and for
Hugging Face GPT-2 models (their own cache object, ``use_cache=True``).

Cost model (:func:`decode_flops`), for a prompt of P tokens and n new tokens:

- *token-forwards* (every linear layer runs once per token fed): without a cache step s feeds
  P + s tokens, sum_{s<n} (P + s) = nP + n(n - 1)/2; with a cache P + (n - 1). The chapter's
  "1 + 2 + ... + 100 = 5050 versus 100, so 50x" is this count for a 1-token prompt.
- *attention* (query, key) pairs, causal: a forward of T tokens after ``past`` cached ones
  scores sum_{i=1..T} (past + i) pairs. Without a cache that is sum_s (P+s)(P+s+1)/2, cubic in
  n; with a cache P(P+1)/2 + sum_{s=1..n-1} (P + s), quadratic. So the chapter's "O(n^2) vs
  O(n)" is right for the linear layers and one power too low for attention.

:func:`kv_cache_bytes` is the memory side: 2 (K and V) x layers x heads x head_dim x bytes per
value x tokens x batch.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from course_lib.generation.sampling import check_sampling_args, next_token
from course_lib.models.families import context_length

# --------------------------------------------------------------------------------------------
# The two loops
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """What a generation loop returns.

    ``tokens``: the generated ids [batch, max_new_tokens]. ``step_seconds`` (when asked for
    with ``step_times=True``): wall time of each step, device-synchronised; step s produces the
    token at position ``prompt_len + s`` and, with a cache, step 0 is the prefill.
    """

    tokens: torch.Tensor
    prompt_len: int
    cached: bool
    step_seconds: list[float] | None = None

    @property
    def positions(self) -> list[int]:
        """Position (0-based, in the full sequence) of the token each step produced."""
        return list(range(self.prompt_len, self.prompt_len + self.tokens.shape[1]))

    @property
    def seconds(self) -> float:
        """Total of ``step_seconds`` (needs ``step_times=True``)."""
        if self.step_seconds is None:
            raise ValueError("no timings recorded: call the loop with step_times=True")
        return sum(self.step_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.numel() / self.seconds


def hf_cache_kwarg(model: torch.nn.Module) -> str:
    """Name of an HF model's cache argument and output field: transformers 5 renamed
    ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _is_course_gpt(model: torch.nn.Module) -> bool:
    return hasattr(model, "new_cache")  # course_lib.models: GPT or Llama


def _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p) -> torch.Tensor:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be token ids [batch, tokens] with at least one token, "
                         f"got shape {tuple(prompt_ids.shape)}")
    context = context_length(model.config)
    if prompt_ids.shape[1] + max_new_tokens > context:
        raise ValueError(
            f"prompt of {prompt_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} = "
            f"{prompt_ids.shape[1] + max_new_tokens} exceeds the model's context of {context} "
            f"positions; at most {context - prompt_ids.shape[1]} new tokens fit"
        )
    return prompt_ids


class _Steps:
    """Collects per-step wall times, synchronising the device around each step when enabled."""

    def __init__(self, enabled: bool, device: torch.device):
        from course_lib.evaluation.speed import sync

        self.enabled, self.device, self._sync = enabled, device, sync
        self.seconds: list[float] | None = [] if enabled else None

    def start(self) -> None:
        if self.enabled:
            self._sync(self.device)
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.enabled:
            self._sync(self.device)
            self.seconds.append(time.perf_counter() - self._t0)


@torch.no_grad()
def generate_no_cache(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int,
                      temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None, *,
                      step_times: bool = False) -> GenerationResult:
    """The chapter's first loop: every step runs the model over the whole sequence so far.

    Step s feeds ``prompt_len + s`` tokens and keeps the last position's logits, so all earlier
    keys and values are recomputed each time.
    """
    ids = _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    prompt_len, ours = ids.shape[1], _is_course_gpt(model)
    timer = _Steps(step_times, ids.device)
    for _ in range(max_new_tokens):
        timer.start()
        logits = model(ids) if ours else model(ids, use_cache=False).logits
        token = next_token(logits[:, -1], temperature, top_k, top_p, generator)
        ids = torch.cat([ids, token[:, None]], dim=1)
        timer.stop()
    return GenerationResult(ids[:, prompt_len:], prompt_len, cached=False, step_seconds=timer.seconds)


@torch.no_grad()
def generate_with_cache(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int,
                        temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None, *,
                        step_times: bool = False) -> GenerationResult:
    """The chapter's second loop: prefill the prompt once, then one token per step with a KV cache.

    For :class:`course_lib.models.gpt.GPT` the cache is a :class:`ContiguousKVCache` sized
    ``prompt_len + max_new_tokens``; for an HF model it is whatever cache object the model
    returns with ``use_cache=True`` (a ``DynamicCache`` in recent transformers).
    """
    ids = _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    prompt_len = ids.shape[1]
    timer = _Steps(step_times, ids.device)
    if _is_course_gpt(model):
        cache = model.new_cache(ids.shape[0], prompt_len + max_new_tokens)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x, cache)
    else:
        key, state = hf_cache_kwarg(model), {}

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = model(x, use_cache=True, **state)
            state[key] = out[key]
            return out.logits

    out, token = [], ids  # the first forward is the prefill over the whole prompt
    for _ in range(max_new_tokens):
        timer.start()
        token = next_token(forward(token)[:, -1], temperature, top_k, top_p, generator)[:, None]
        out.append(token)
        timer.stop()
    return GenerationResult(torch.cat(out, dim=1), prompt_len, cached=True,
                            step_seconds=timer.seconds)


# --------------------------------------------------------------------------------------------
# Memory: how many bytes the keys and values take
# --------------------------------------------------------------------------------------------


def kv_cache_bytes(n_layer: int, n_head: int, head_dim: int, tokens: int, batch: int = 1,
                   dtype_bytes: int = 2) -> int:
    """Bytes of a KV cache: 2 (K and V) x n_layer x n_head x head_dim x dtype_bytes x tokens x batch.

    ``n_head`` is the number of *key/value* heads (fewer than query heads under grouped-query
    attention); ``dtype_bytes`` is 2 for fp16/bf16, 4 for fp32.
    """
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("head_dim", head_dim),
                        ("tokens", tokens), ("batch", batch), ("dtype_bytes", dtype_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return 2 * n_layer * n_head * head_dim * dtype_bytes * tokens * batch


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of an HF config (GPT-2, LLaMA, ...) or a GPTConfig."""
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def kv_cache_bytes_for(config, tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """:func:`kv_cache_bytes` for a model config (HF ``GPT2Config``/``LlamaConfig`` or GPTConfig)."""
    return kv_cache_bytes(*kv_shape(config), tokens=tokens, batch=batch, dtype_bytes=dtype_bytes)


def cached_keys_values(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) each layer of a cache holds now: a :class:`ContiguousKVCache` (its
    filled part) or an HF cache (``DynamicCache`` of transformers 4.x/5.x, or legacy tuples)."""
    if hasattr(cache, "length") and hasattr(cache, "k"):  # ContiguousKVCache
        return [(cache.k[i, :, :, :cache.length], cache.v[i, :, :, :cache.length])
                for i in range(cache.k.shape[0])]
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # legacy tuple of (key, value) per layer


# --------------------------------------------------------------------------------------------
# Compute: analytic FLOPs of each loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeFlops:
    """FLOPs (2 per multiply-add) of a generation loop, split into its two parts.

    ``linear``: the matmuls of every linear layer (attention in/out projections, MLP, lm_head)
    for every token fed; ``attention``: scores (Q K^T) and weighted values (A V) over the causal
    (query, key) pairs. Embedding look-ups, LayerNorm, softmax, GELU are left out (they are
    O(d) per token, small beside O(d^2)).
    """

    token_forwards: int
    attention_pairs: int
    linear: int
    attention: int

    @property
    def total(self) -> int:
        return self.linear + self.attention


def _causal_pairs(new: int, past: int) -> int:
    """(query, key) pairs when ``new`` tokens attend causally after ``past`` cached ones."""
    return new * past + new * (new + 1) // 2


def decode_flops(config, prompt_len: int, new_tokens: int, cached: bool,
                 batch: int = 1) -> DecodeFlops:
    """Analytic FLOPs of generating ``new_tokens`` after a ``prompt_len`` prompt, one loop.

    Per token fed, each of L layers does 2 FLOPs per weight of its linear layers (GPT-2:
    d·3d + d·d + 2·d·d_ff with d_ff = 4d; LLaMA: q and o d·(H·hd) each, k and v d·(Hkv·hd)
    each, SwiGLU 3·d·d_ff) and lm_head 2·d·V: what ``model(ids)`` computes, since both the
    course's models and HF's return logits for every position fed. Per causal (query, key) pair
    and layer, attention does 2·H·hd for Q·K and 2·H·hd for A·V (summed over query heads).

    - no cache: step s (0 <= s < n) feeds the P + s tokens of the sequence so far;
    - cache: step 0 feeds the P prompt tokens (prefill), step s >= 1 feeds one token after
      P + s - 1 cached ones. The last generated token is never fed in either loop.

    Everything scales with ``batch`` (sequences generated side by side).
    """
    if prompt_len < 1 or new_tokens < 1 or batch < 1:
        raise ValueError(f"prompt_len, new_tokens and batch must be >= 1, got {prompt_len}, "
                         f"{new_tokens} and {batch}")
    n_layer, kv_heads, head_dim = kv_shape(config)
    d = getattr(config, "n_embd", None) or config.hidden_size
    q_dim = (getattr(config, "n_head", None) or config.num_attention_heads) * head_dim
    llama = hasattr(config, "intermediate_size")  # LLaMA family: GQA and a SwiGLU MLP
    d_ff = config.intermediate_size if llama else (getattr(config, "n_inner", None) or 4 * d)
    attn_weights = 2 * d * q_dim + 2 * d * kv_heads * head_dim
    mlp_weights = (3 if llama else 2) * d * d_ff
    per_token = n_layer * 2 * (attn_weights + mlp_weights) + 2 * d * config.vocab_size
    per_pair = n_layer * 4 * q_dim
    if cached:
        forwards = [(prompt_len, 0)] + [(1, prompt_len + s - 1) for s in range(1, new_tokens)]
    else:
        forwards = [(prompt_len + s, 0) for s in range(new_tokens)]
    tokens = batch * sum(t for t, _ in forwards)
    pairs = batch * sum(_causal_pairs(t, past) for t, past in forwards)
    return DecodeFlops(tokens, pairs, tokens * per_token, pairs * per_pair)


def flop_ratio(config, prompt_len: int, new_tokens: int) -> float:
    """Analytic speed-up of the cache: no-cache FLOPs / cached FLOPs."""
    return (decode_flops(config, prompt_len, new_tokens, cached=False).total
            / decode_flops(config, prompt_len, new_tokens, cached=True).total)
