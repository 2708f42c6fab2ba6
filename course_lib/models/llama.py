"""A minimal LLaMA-family model (LLaMA 2/3, Qwen2) in the style of gpt-fast, loading HF weights.

Same interface as :class:`course_lib.models.gpt.GPT` (``forward(idx, cache, attention_mask,
logits_to_keep)``, ``new_cache``, ``from_hf``), same caches and attention
(:mod:`course_lib.models.attention`). What differs from GPT-2, each a few lines below:

- **RMSNorm** instead of LayerNorm: scale by 1 / root-mean-square, no mean, no bias (in float32).
- **Rotary position embeddings** (RoPE) instead of a learned position table: the two halves of
  every query and key head are rotated by angles ``position * inv_freq``, so ``q . k`` depends
  on the *distance* between the tokens. ``rope_scaling`` stretches the frequencies for longer
  contexts ("linear", or Llama 3.1's "llama3" that stretches only the low frequencies).
- **Grouped-query attention**: ``num_key_value_heads`` K/V heads, each shared by
  ``num_attention_heads / num_key_value_heads`` query heads; caches hold only the K/V heads.
- **SwiGLU MLP**: ``down(silu(gate(x)) * up(x))``; no biases anywhere but Qwen2's q/k/v.

Module names are HF's (``model.layers.0.self_attn.q_proj``) and HF's ``nn.Linear`` layout is
ours, so an HF state dict loads as is.
"""

from __future__ import annotations

import math
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

MODEL_TYPES = ("llama", "qwen2")
#: RoPE types and the ``rope_scaling`` keys each one needs.
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def check_model_type(model_type) -> None:
    """Only the families this module implements."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(MODEL_TYPES)}")


@dataclass
class LlamaConfig:
    """The numbers that define a LLaMA / Qwen2 model (names as in HF's ``LlamaConfig``).

    ``rope_scaling`` is None (plain RoPE) or a dict with ``rope_type`` ("linear" or "llama3")
    and that type's parameters. The read-only ``n_*`` properties give GPT-2's names, so shared
    code (caches, engine) treats both families alike.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v only (Qwen2); o_proj never has one
    model_type: str = "llama"

    def __post_init__(self) -> None:
        check_model_type(self.model_type)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling is not None:  # old configs say "type", new ones "rope_type"
            self.rope_scaling = dict(self.rope_scaling)
            rope_type = self.rope_scaling.setdefault("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_type {rope_type!r} (rope_scaling) is not supported; "
                                 f"supported: {', '.join(ROPE_TYPES)}")
            missing = [k for k in ROPE_TYPES[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling of rope_type {rope_type!r} needs {missing}")

    n_layer = property(lambda self: self.num_hidden_layers)
    n_head = property(lambda self: self.num_attention_heads)
    n_kv_head = property(lambda self: self.num_key_value_heads)
    n_embd = property(lambda self: self.hidden_size)
    n_positions = property(lambda self: self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf_config) -> LlamaConfig:
        """Build from a ``transformers`` ``LlamaConfig`` or ``Qwen2Config`` (4.x or 5.x)."""
        model_type = getattr(hf_config, "model_type", None)
        check_model_type(model_type)  # before reading fields a foreign config may lack
        for field, default, ok in (("hidden_act", "silu", "silu"), ("mlp_bias", False, False),
                                   ("use_sliding_window", False, False)):
            if getattr(hf_config, field, default) != ok:
                raise ValueError(f"{field}={getattr(hf_config, field)!r} is not supported; "
                                 f"supported: {field}={ok!r}")
        # transformers 5 keeps everything in rope_parameters (rope_type, rope_theta, ...); 4.x
        # has rope_theta beside rope_scaling ({"type" or "rope_type": ..., ...} or None).
        rope = dict(getattr(hf_config, "rope_parameters", None)
                    or getattr(hf_config, "rope_scaling", None) or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("rope_parameters per layer type are not supported; supported: one "
                             "rope_parameters dict for all layers")
        theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", 10000.0)
        partial = rope.pop("partial_rotary_factor", None) or getattr(hf_config, "partial_rotary_factor", None) or 1.0
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial!r} is not supported; supported: 1.0")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None),
            head_dim=getattr(hf_config, "head_dim", None),
            max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            model_type=model_type)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """RoPE's inverse frequencies ``rope_theta ** (-2i / head_dim)``, i < head_dim / 2, in float32,
    with the config's ``rope_scaling`` applied (as HF computes them)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":  # positions / factor: the same angles as inv_freq / factor
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Wavelengths longer than old_len / low_freq_factor are stretched by factor, those
        # shorter than old_len / high_freq_factor kept; in between, a blend linear in old_len / wavelen.
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen > old_len / low, inv_freq / factor,
                           torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, heads, D] by ``cos``/``sin`` [B or 1, T, D] (HF's rotate_half
    convention: dimension i pairs with i + D/2)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # in float32 then back, as HF does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx = layer_idx
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: ContiguousKVCache | PagedAttentionMetadata | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if isinstance(cache, PagedAttentionMetadata):
            y = paged_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cache, self.layer_idx)
            return self.o_proj(y.reshape(B, T, -1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)
        y = causal_attention(q, k, v, past, attention_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = nn.SiLU()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, attention_mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A LLaMA-family model returning logits [batch, tokens, vocab]."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A plain tensor, not a buffer: .to(dtype) must not round it, nor the state dict hold it.
        self.inv_freq = rope_inv_freq(config)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B or 1, T, head_dim] of each token's angles, from its position [B or 1, T]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, idx: torch.Tensor, cache: ContiguousKVCache | PagedAttentionMetadata | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits for token ids ``idx`` [B, T]; with a cache, ``idx`` continues the cached ones.

        The contract of :meth:`course_lib.models.gpt.GPT.forward`: ``attention_mask`` [B, past + T]
        (1 = token, 0 = left padding) masks padding keys and numbers positions (here: rotation
        angles) from each row's first real token; ``logits_to_keep=k`` keeps the last k positions;
        with paged metadata, ``idx`` is [1, N] and the logits [1, S, vocab], one per sequence.
        """
        if isinstance(cache, PagedAttentionMetadata):
            return self._forward_paged(idx, cache)
        past = cache.length if cache is not None else 0
        T = idx.size(1)
        pos = token_positions(idx, past, attention_mask, self.config.n_positions)
        x = self.model.embed_tokens(idx)
        cos, sin = self._rope(pos, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, attention_mask)
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

    def _forward_paged(self, idx: torch.Tensor, meta: PagedAttentionMetadata) -> torch.Tensor:
        check_paged_input(idx, meta, self.config)
        x = self.model.embed_tokens(idx)
        cos, sin = self._rope(meta.positions[None], x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta)
        x = x[:, meta.logits_indices]  # only each sequence's last token needs logits
        return self.lm_head(self.model.norm(x))

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> ContiguousKVCache:
        """A contiguous KV cache (KV heads only) matching this model's shape, dtype and device."""
        w = self.model.embed_tokens.weight
        return ContiguousKVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device)

    @classmethod
    def from_hf(cls, hf_model) -> Llama:
        """Copy an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``'s weights into a new :class:`Llama`."""
        model = cls(LlamaConfig.from_hf(hf_model.config))
        model.load_hf_state_dict(hf_model.state_dict())
        w = next(hf_model.parameters())
        return model.to(device=w.device, dtype=w.dtype).eval()

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load HF weights (missing or unexpected weights are an error).

        Drops old checkpoints' ``rotary_emb.inv_freq`` buffers (recomputed from the config),
        accepts keys with or without ``model.`` (``LlamaModel`` vs ``LlamaForCausalLM``), and
        ties ``lm_head`` to ``embed_tokens`` when the config ties them and the checkpoint omits it.
        """
        out = {}
        for key, value in state_dict.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            out[key if key.startswith(("model.", "lm_head.")) else "model." + key] = value
        if self.config.tie_word_embeddings and "model.embed_tokens.weight" in out:
            out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
        self.load_state_dict(out, strict=True)
