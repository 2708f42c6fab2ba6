"""What attention looks like to both model families (GPT-2 and LLaMA): the KV caches and the two
ways of attending, over a contiguous cache and over a paged one.

The models project their own queries, keys and values (and LLaMA rotates them); from there on the
work is the same, with one generalisation GPT-2 does not need: *grouped-query attention* (GQA).
A GQA model has ``Hkv`` key/value heads shared by ``H = g * Hkv`` query heads, query head ``h``
reading KV head ``h // g``. Only the ``Hkv`` heads are cached, so the cache is ``g`` times smaller
than with one KV head per query head. GPT-2 is the special case ``Hkv = H``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from course_lib.models.paged import PagedAttentionMetadata

#: The torch (CPU) decode path batches a step's decodes whatever their lengths: it cuts them, in
#: order, into calls (:func:`decode_groups`). Short contexts are padded together, one masked SDPA
#: call per group: a group grows while padding reads at most ``PADDED_DECODE_MAX_WASTE`` times
#: the keys actually needed and at most ``PADDED_DECODE_MAX_KEYS`` keys in all. A context longer
#: than ``PADDED_DECODE_MAX_CONTEXT`` (and a group of one) goes instead to the unmasked fused
#: SDPA over its own blocks, consecutive ones in one call: per key, the masked call is slower, and
#: one call over everything gathers a copy of every K/V the step reads (megabytes) that no longer
#: stays in cache. Measured with ``benchmarks/cpu_decode_attention.py`` on a 2-core CPU.
PADDED_DECODE_MAX_WASTE = 1.5
PADDED_DECODE_MAX_KEYS = 2048
PADDED_DECODE_MAX_CONTEXT = 384


class DecodeCall(NamedTuple):
    """Decodes ``start .. end - 1`` in one call: ``padded`` to ``longest`` and masked, or each
    over its own blocks (unmasked)."""

    start: int
    end: int
    longest: int
    padded: bool


def decode_groups(context_lens: list[int], max_keys: int | None = None,
                  max_waste: float | None = None,
                  max_context: int | None = None) -> list[DecodeCall]:
    """Cut decodes with these context lengths, in order, into :class:`DecodeCall` s (the
    defaults are ``PADDED_DECODE_MAX_*``, read when called)."""
    max_keys = PADDED_DECODE_MAX_KEYS if max_keys is None else max_keys
    max_waste = PADDED_DECODE_MAX_WASTE if max_waste is None else max_waste
    max_context = PADDED_DECODE_MAX_CONTEXT if max_context is None else max_context
    runs, start, longest, total = [], 0, 0, 0
    for i, n in enumerate(context_lens):  # greedy runs of paddable decodes
        wider = max(longest, n)
        size = i - start + 1
        if i > start and (n > max_context or context_lens[start] > max_context
                          or size * wider > max_keys or size * wider > max_waste * (total + n)):
            runs.append((start, i, longest))
            start, wider, total = i, n, 0
        longest, total = wider, total + n
    if context_lens:
        runs.append((start, len(context_lens), longest))
    calls: list[DecodeCall] = []
    for a, b, longest in runs:  # groups of one: unmasked, merged with their neighbours
        if b - a > 1:
            calls.append(DecodeCall(a, b, longest, True))
        elif calls and not calls[-1].padded:
            calls[-1] = DecodeCall(calls[-1].start, b, max(calls[-1].longest, longest), False)
        else:
            calls.append(DecodeCall(a, b, longest, False))
    return calls


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
    if meta.tensors_only:  # a compiled decode step: built and checked by its engine
        return
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
        paged_decode_attention_padded,
        paged_decode_attention_unchecked,
        paged_prefill_attention_unchecked,
        store_kv_unchecked,
    )

    if meta.tensors_only:
        return decode_attention_tensors(q, k, v, meta, layer)
    # The metadata was built and checked once for the step (PagedAttentionMetadata.build,
    # check_paged_input): every layer calls the unchecked kernels and twins, and takes its
    # host-side values (context lengths, decode groups) from the metadata, so no layer reads a
    # device tensor back to Python (on a GPU: a wait for every queued kernel, once per layer).
    use_triton = meta.use_triton
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    store_kv_unchecked(k, v, k_cache, v_cache, meta.slot_mapping, use_triton)
    d = meta.num_decodes
    host_lens = meta.context_lens_host
    if host_lens is None:  # metadata built by hand, without the host copy
        host_lens = meta.context_lens_host = meta.context_lens.tolist()
    tables, lens = meta.block_tables, meta.context_lens
    parts = []
    if d and use_triton:  # decodes (one token each, first in the batch): flash-decoding
        parts.append(paged_decode_attention_unchecked(q[:d], k_cache, v_cache, tables[:d],
                                                      lens[:d], use_triton=True))
    elif d:  # the torch twins, a few calls for all decodes (PADDED_DECODE_MAX_*)
        if meta.decode_groups is None:  # once per step (the first layer), not once per layer
            meta.decode_groups = decode_groups(host_lens[:d])
        for a, b, longest, padded in meta.decode_groups:
            parts.append(
                paged_decode_attention_padded(q[a:b], k_cache, v_cache, tables[a:b], lens[a:b],
                                              max_context=longest) if padded else
                paged_prefill_attention_unchecked(q[a:b], k_cache, v_cache, tables[a:b],
                                                  host_lens[a:b], [1] * (b - a)))
    if d < len(meta.query_lens):  # prompts and prompt chunks: causal attention in torch
        parts.append(paged_prefill_attention_unchecked(q[d:], k_cache, v_cache, tables[d:],
                                                       host_lens[d:], meta.query_lens[d:]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def decode_attention_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             meta: PagedAttentionMetadata, layer: int) -> torch.Tensor:
    """Decode attention from tensors alone (``DecodeBatchMetadata``), for ``torch.compile``.

    A pure function of the cache: the row's cached keys (its ``W`` blocks gathered, masked past
    ``context_lens - 1``) plus its new key, one masked SDPA. The new K/V are not written here
    but collected in ``meta.new_kv``, and stored for all layers at once after the graph: a
    compiled graph that writes into a view of a large input tensor may copy the whole tensor.
    ``q`` [B, H, D], ``k``/``v`` [B, Hkv, D] -> [B, H, D].
    """
    meta.new_kv.append((k, v))
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    B, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    T = meta.block_tables.shape[1] * bs
    table = meta.block_tables.long().reshape(-1)
    compute = q.dtype if q.device.type == "cuda" else torch.float32
    keys, values = (torch.cat([c.index_select(0, table).view(B, T, Hkv, D), new[:, None]], 1)
                    .transpose(1, 2).to(compute) for c, new in ((k_cache, k), (v_cache, v)))
    cached = torch.arange(T, device=q.device)[None, :] < (meta.context_lens.long() - 1)[:, None]
    visible = torch.cat([cached, cached.new_ones(B, 1)], 1)  # [B, T + 1]: the new key too
    args = (q[:, :, None, :].to(compute), keys, values)
    if Hkv != H:  # a branch, not enable_gqa=(Hkv != H): traced shapes may be symbolic
        out = F.scaled_dot_product_attention(*args, attn_mask=visible[:, None, None, :], enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(*args, attn_mask=visible[:, None, None, :])
    return out[:, :, 0, :].to(q.dtype)
