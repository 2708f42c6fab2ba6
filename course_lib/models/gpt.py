"""A minimal GPT-2 (in the style of nanoGPT / gpt-fast) that loads any HF GPT-2 state dict.

Why have our own model when ``transformers`` has one? Because the later chapters change the
inside of attention: a contiguous KV cache (chapter 4), a paged one (chapter 6), quantized
linears (chapters 1-3). A flat, ~200-line model makes those changes visible. Module names
mirror HF's (``transformer.h.0.attn.c_attn``), so an HF state dict loads with one twist: HF's
``Conv1D`` stores weights as [in, out], ``nn.Linear`` as [out, in], hence the transposes in
:func:`convert_hf_state_dict`.

The KV cache is pluggable: pass ``cache=None`` to recompute everything (what the chapter calls
"no cache"), a :class:`ContiguousKVCache` to keep keys and values between calls, or a
:class:`~course_lib.models.paged.PagedAttentionMetadata` (chapters 5-6): then ``idx`` is [1, N],
the new tokens of many sequences side by side, their K/V go to a paged cache by slot mapping and
each sequence attends to its own blocks. ``attention_mask`` (1 = token, 0 = padding, HF's
convention) lets a left-padded batch share one contiguous cache (the static-batching baseline).
The caches and both ways of attending live in :mod:`course_lib.models.attention`, shared with the
LLaMA family (:mod:`course_lib.models.llama`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from course_lib.models.attention import (
    ContiguousKVCache,
    causal_attention,
    check_paged_input,
    paged_attention,
    token_positions,
)
from course_lib.models.paged import PagedAttentionMetadata

#: HF GPT-2 weights stored by Conv1D as [in, out]; transposed into nn.Linear's [out, in].
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig:
    """The few numbers that define a GPT-2 (names as in HF's ``GPT2Config``)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        """Key/value heads: GPT-2 has one per query head (what a GQA model shares)."""
        return self.n_head

    @classmethod
    def from_hf(cls, hf_config) -> GPTConfig:
        """Build from a ``transformers.GPT2Config`` (or anything with the same attributes)."""
        return cls(**{f: getattr(hf_config, f) for f in cls.__dataclass_fields__})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.head_dim, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, cache: ContiguousKVCache | PagedAttentionMetadata | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if isinstance(cache, PagedAttentionMetadata):
            q, k, v = (t.reshape(-1, self.n_head, self.head_dim) for t in (q, k, v))
            return self.c_proj(paged_attention(q, k, v, cache, self.layer_idx).reshape(B, T, C))
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)
        y = causal_attention(q, k, v, past, attention_mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; a module so AWQ can scale it
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: ContiguousKVCache | PagedAttentionMetadata | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, attention_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 returning logits [batch, tokens, vocab]; ``lm_head`` is tied to ``wte``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor, cache: ContiguousKVCache | PagedAttentionMetadata | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits for token ids ``idx`` [B, T]; with a cache, ``idx`` continues the cached ones.

        ``attention_mask`` [B, past + T] (1 = token, 0 = left padding) masks padding keys and
        numbers positions from each row's first real token, as HF does. ``logits_to_keep=k``
        computes logits for the last k positions only (HF's name; 0 = all): generation needs
        just the last, and the vocabulary projection of a whole prompt is not free. With paged
        metadata, ``idx`` is [1, N] and the logits are [1, S, vocab], one per sequence's last token.
        """
        if isinstance(cache, PagedAttentionMetadata):
            return self._forward_paged(idx, cache)
        past = cache.length if cache is not None else 0
        T = idx.size(1)
        pos = token_positions(idx, past, attention_mask, self.config.n_positions)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, cache, attention_mask)
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.transformer.ln_f(x))

    def _forward_paged(self, idx: torch.Tensor, meta: PagedAttentionMetadata) -> torch.Tensor:
        check_paged_input(idx, meta, self.config)
        x = self.transformer.wte(idx) + self.transformer.wpe(meta.positions)[None]
        for block in self.transformer.h:
            x = block(x, meta)
        x = x[:, meta.logits_indices]  # only each sequence's last token needs logits
        return self.lm_head(self.transformer.ln_f(x))

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> ContiguousKVCache:
        """A contiguous KV cache matching this model's shape, dtype and device."""
        w = self.transformer.wte.weight
        return ContiguousKVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device)

    @classmethod
    def from_hf(cls, hf_model) -> GPT:
        """Copy an HF ``GPT2LMHeadModel``'s weights into a new :class:`GPT`."""
        model = cls(GPTConfig.from_hf(hf_model.config))
        model.load_hf_state_dict(hf_model.state_dict())
        w = hf_model.transformer.wte.weight
        return model.to(device=w.device, dtype=w.dtype).eval()

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load HF GPT-2 weights (missing or unexpected weights are an error)."""
        self.load_state_dict(convert_hf_state_dict(state_dict), strict=True)


def convert_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose an HF GPT-2 state dict into this module's layout.

    Drops HF's non-weight buffers (``attn.bias`` / ``attn.masked_bias`` causal masks), accepts
    keys with or without the ``transformer.`` prefix (``GPT2Model`` vs ``GPT2LMHeadModel``),
    and ties ``lm_head`` to ``wte`` when the checkpoint omits it.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = value.t().contiguous() if key.endswith(_CONV1D_SUFFIXES) else value
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; tied weights (lm_head and wte) count once."""
    return sum(p.numel() for p in model.parameters())
