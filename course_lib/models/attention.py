"""What attention looks like to both model families (GPT-2 and LLaMA): the KV caches and the two
ways of attending, over a contiguous cache and over a paged one.

The models project their own queries, keys and values (and LLaMA rotates them); from there on the
work is the same, with one generalisation GPT-2 does not need: *grouped-query attention* (GQA).
A GQA model has ``Hkv`` key/value heads shared by ``H = g * Hkv`` query heads, query head ``h``
reading KV head ``h // g``. Only the ``Hkv`` heads are cached, so the cache is ``g`` times smaller
than with one KV head per query head. GPT-2 is the special case ``Hkv = H``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.models.paged import PagedAttentionMetadata

#: The torch (CPU) decode path pads a batch of decodes to its longest context and runs one
#: masked SDPA call when that reads at most ``PADDED_DECODE_MAX_WASTE`` times the keys actually
#: needed and at most ``PADDED_DECODE_MAX_KEYS`` keys in all; else one unmasked call per
#: sequence. On a 2-core CPU with the tiny model, padding won for a few short contexts and lost
#: badly on long ones (the masked call is slower than per-sequence fused attention there), hence
#: the key cap; see the issue 7 note for that A/B.
PADDED_DECODE_MAX_WASTE = 2.0
PADDED_DECODE_MAX_KEYS = 1024


class ContiguousKVCache:
    """Keys and values of every layer in preallocated [batch, kv_heads, max_len, head_dim] tensors.

    ``config`` is either family's config (it needs ``n_layer``, ``n_kv_head``, ``head_dim`` and
    ``n_positions``); only the KV heads are stored. ``length`` counts the cached positions; the
    model writes the new tokens' keys and values at ``length`` and advances it once per forward
    pass. ``truncate`` rolls it back (speculative decoding discards rejected draft tokens this way).
    """

    def __init__(self, config, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len or config.n_positions
        shape = (config.n_layer, batch_size, config.n_kv_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ([B, Hkv, T, D]) after the cached positions; return all keys/values."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate length must be in [0, {self.length}], got {length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the whole preallocated buffer)."""
        return self.k.numel() * self.k.element_size() * 2


def token_positions(idx: torch.Tensor, past: int, attention_mask: torch.Tensor | None,
                    context: int) -> torch.Tensor:
    """Positions [1 or B, T] of the T new tokens of ``idx`` [B, T] after ``past`` cached ones.

    Checked once per forward pass, for both families: the sequence must fit the ``context``,
    and ``attention_mask`` [B, past + T] (1 = token, 0 = left padding) numbers positions from
    each row's first real token, as HF's ``generate`` does.
    """
    T = idx.size(1)
    if past + T > context:
        raise ValueError(f"sequence of {past + T} tokens exceeds the model's context of {context}")
    if attention_mask is None:
        return torch.arange(past, past + T, device=idx.device)[None]
    if attention_mask.shape != (idx.size(0), past + T):
        raise ValueError(f"attention_mask must be [batch, past + new tokens] = "
                         f"{[idx.size(0), past + T]}, got {list(attention_mask.shape)}")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]


def check_paged_input(idx: torch.Tensor, meta: PagedAttentionMetadata, config) -> None:
    """A paged forward takes ``idx`` [1, N], N new tokens at positions below the context, over a
    cache shaped for this model (its layers, KV heads and head size): a cache built for another
    model would otherwise be read with the wrong head layout, silently."""
    context = config.n_positions
    want = (config.n_layer, config.n_kv_head, config.head_dim)
    got = (meta.cache.k.shape[0], *meta.cache.k.shape[3:])
    if got != want:
        raise ValueError(f"the paged KV cache has (layers, KV heads, head_dim) = {got} but the model "
                         f"needs {want}; build it with PagedKVCache.for_model(model, ...)")
    if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) != meta.positions.numel():
        raise ValueError(f"paged forward takes idx [1, N] with N = {meta.positions.numel()} "
                         f"new tokens, got {list(idx.shape)}")
    lens = meta.context_lens_host
    last = max(lens) - 1 if lens is not None else int(meta.positions.max())  # host copy: no sync
    if last >= context:
        raise ValueError(f"position {last} exceeds the model's context of {context}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int = 0,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T new queries over ``past`` cached positions and themselves.

    ``q`` [B, H, T, D]; ``k``/``v`` [B, Hkv, past + T, D] with H a multiple of Hkv (query head h
    reads KV head h // (H // Hkv): SDPA's ``enable_gqa``, which on a CPU ran 1.5-20x faster than
    ``repeat_interleave`` of K/V for tiny to small shapes). ``attention_mask`` [B, past + T]
    (1 = token, 0 = left padding) hides padding keys. Returns [B, H, T, D].
    """
    T = q.size(2)
    gqa = k.size(1) != q.size(1)
    if past == 0 and attention_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Query i sits at position past + i and may see keys 0 .. past + i.
    keep = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    if attention_mask is not None:  # [B, past + T]: padding keys are never seen, but a
        keep = keep & attention_mask[:, None, None, :].bool()  # query always sees itself
        cols = torch.arange(past + T, device=q.device)
        keep = keep | (cols[None, :] == cols[past:, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    meta: PagedAttentionMetadata, layer: int) -> torch.Tensor:
    """Store the step's new K/V by slot mapping, then attend over each sequence's blocks.

    ``q`` [N, H, D], ``k``/``v`` [N, Hkv, D]: the new tokens of every sequence side by side, as
    :class:`PagedAttentionMetadata` lays them out; the cache holds the Hkv heads only (each
    kernel maps query head h to KV head h // (H / Hkv)). Returns [N, H, D].
    """
    from course_lib.kernels.paged_attention import (
        paged_decode_attention,
        paged_decode_attention_padded,
        paged_prefill_attention,
        store_kv,
    )

    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping, backend=meta.backend, validate=False)
    # Decodes (one token each, first in the batch) go to the flash-decoding kernel. The torch
    # path batches short ones into one padded SDPA call (PADDED_DECODE_MAX_*); otherwise it
    # serves them one sequence at a time over their own blocks (below).
    # Host-side values come from the metadata (built once per step): no layer reads a device
    # tensor back to Python, which on a GPU would wait for every queued kernel, once per layer.
    d = meta.num_decodes
    host_lens = meta.context_lens_host
    if host_lens is None:  # metadata built by hand, without the host copy
        host_lens = meta.context_lens.tolist()
    parts = []
    if d and meta.backend == "torch":
        longest = max(host_lens[:d])
        padded = d * longest
        if d == 1 or padded > PADDED_DECODE_MAX_WASTE * sum(host_lens[:d]) \
                or padded > PADDED_DECODE_MAX_KEYS:
            d = 0
        else:
            parts.append(paged_decode_attention_padded(q[:d], k_cache, v_cache, meta.block_tables[:d],
                                                       meta.context_lens[:d], max_context=longest))
    elif d:
        parts.append(paged_decode_attention(q[:d], k_cache, v_cache, meta.block_tables[:d],
                                            meta.context_lens[:d], backend=meta.backend,
                                            validate=False))  # built by us: no GPU syncs
    if d < len(meta.query_lens):  # prompts and prompt chunks: causal attention in torch
        parts.append(paged_prefill_attention(q[d:], k_cache, v_cache, meta.block_tables[d:],
                                             host_lens[d:], meta.query_lens[d:],
                                             validate=False))
    return torch.cat(parts) if len(parts) > 1 else parts[0]
