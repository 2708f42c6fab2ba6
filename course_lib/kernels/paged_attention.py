"""Paged attention: a KV cache stored in fixed-size blocks, and decode attention that reads it.

The layout (as in vLLM). The cache of one layer is two tensors ``k_cache, v_cache`` of shape
``[num_blocks, block_size, Hkv, D]``: a pool of physical blocks shared by every sequence. Sequence
``i`` owns a list of physical blocks, its row of ``block_tables``; logical token ``t`` of the
sequence lives in block ``block_tables[i, t // block_size]`` at offset ``t % block_size``. A token's
*slot* is ``physical_block * block_size + offset``. Nothing needs to be contiguous, so memory is
handed out one block at a time and only the last block of a sequence is partly empty.

Grouped-query attention (GQA). The cache holds only the ``Hkv`` key/value heads; the ``H`` query
heads (a multiple of ``Hkv``) share them in groups of ``g = H / Hkv``: query head ``h`` reads KV
head ``h // g`` (LLaMA 2 70B, LLaMA 3, SmolLM2: ``g`` = 3 to 8; GPT-2: ``g = 1``). The cache is
``g`` times smaller, and the decode kernel reads each KV head once for its whole group.

Writing (:func:`store_kv`): the new tokens' keys and values go to their slots, one program per token.

Decode (:func:`paged_decode_attention`): one new query per sequence attends to its ``L`` cached
tokens (the current one included)::

    out = softmax(q . K^T * scale) V,   K, V = the L keys and values gathered through the table

Flash-decoding splits the L tokens over ``num_splits`` programs per (sequence, KV head), so a small
batch still fills the GPU. Split ``s`` walks its share of the blocks and keeps an *online
softmax* in float32: a running max ``m``, a running sum ``l = sum exp(x - m)`` and a running
``acc = sum exp(x - m) v``; when a new tile raises the max to ``m'``, the old sums are rescaled by
``exp(m - m')``. At the end it writes its partial output ``o_s = acc / l`` and its log-sum-exp
``lse_s = m + log(l)``. Because ``exp(lse_s)`` is the split's softmax denominator, the splits
merge exactly (a second small Triton kernel)::

    lse = log sum_s exp(lse_s),    out = sum_s exp(lse_s - lse) * o_s

A split that gets no tokens (context shorter than the split) writes ``o_s = 0, lse_s = -inf``: its
weight ``exp(-inf)`` is 0, and no NaN appears. With one split the kernel writes the output itself.

Prefill (:func:`paged_prefill_attention`) stays in torch: many queries per sequence make it
compute-bound, where ``scaled_dot_product_attention`` already runs a fused kernel; the only paged
part is gathering each sequence's K/V from its blocks (:func:`gather_kv`).
"""

import torch
import torch.nn.functional as F

from course_lib.kernels._triton import tl, triton
from course_lib.kernels.quant import _check_float, _use_triton, interpreter_bf16_workaround

INT_DTYPES = (torch.int32, torch.int64)
MIN_TOKENS_PER_SPLIT = 256  # a split shorter than this costs more to merge than it saves
MAX_SPLITS = 32
PROGRAMS_PER_SM = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ torch reference twins


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table_row: torch.Tensor,
              context_len) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``context_len`` keys and values of one sequence, in order: ``(k [L, Hkv, D], v [L, Hkv, D])``.

    Takes the sequence's first ``ceil(L / block_size)`` physical blocks from its block-table row,
    lays them end to end and drops the unused tail of the last block.
    """
    block_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    L = int(context_len)
    n = _cdiv(L, block_size)
    if L < 1 or n > block_table_row.numel():
        raise ValueError(f"gather_kv: context_len must be in 1..{block_table_row.numel() * block_size} "
                         f"(the row holds {block_table_row.numel()} blocks of {block_size}), got {L}")
    blocks = block_table_row[:n].long()
    if bool(((blocks < 0) | (blocks >= num_blocks)).any()):
        raise ValueError(f"gather_kv: block_table_row[:{n}] must hold block ids in 0..{num_blocks - 1}, "
                         f"got {blocks.tolist()}")
    return _gather(k_cache, v_cache, blocks, L)


def _gather(k_cache, v_cache, blocks: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_kv` without the checks. [n, block_size, Hkv, D] -> [n * block_size, Hkv, D] ->
    [L, Hkv, D]; index_select copies whole blocks, about twice as fast as k_cache[blocks] on a CPU."""
    k = k_cache.index_select(0, blocks).flatten(0, 1)[:L]
    v = v_cache.index_select(0, blocks).flatten(0, 1)[:L]
    return k, v


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Torch twin of :func:`store_kv`: ``cache[slot // block_size, slot % block_size] = new``."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # negative slot: padding, not stored
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = key[keep]
    v_cache[slots // block_size, slots % block_size] = value[keep]


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale=None) -> torch.Tensor:
    """Torch twin of :func:`paged_decode_attention`, in float32, the whole batch at once.

    Gathers every row of the block table (padding entries clamped to a valid block), masks the
    positions at or beyond each context length, and takes an ordinary softmax. Query head ``h``
    reads KV head ``h // (H / Hkv)``.
    """
    B, H, D = q.shape
    num_blocks, g = k_cache.shape[0], H // k_cache.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    table = block_tables.long().clamp(0, num_blocks - 1)  # padding -> some block, masked below
    k = k_cache[table].flatten(1, 2).float()  # [B, max_blocks, block_size, Hkv, D] -> [B, T, Hkv, D]
    v = v_cache[table].flatten(1, 2).float()
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)  # [B, T, H, D]
    visible = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens.long()[:, None]
    scores = torch.einsum("bhd,bthd->bht", q.float(), k) * scale
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(dim=-1), v).to(q.dtype)


def paged_decode_attention_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale=None, *, max_context: int | None = None) -> torch.Tensor:
    """Decode attention for a whole batch in one SDPA call, in torch (the CPU's fast path).

    Gathers every sequence's blocks with one ``index_select`` into a ``[B, H, T, D]`` batch
    padded to the longest context and masks the padding. One call instead of one per sequence
    wins when the contexts are of similar length; with very unequal ones the padding costs more
    than it saves, so the model only takes this path when padding at most doubles the keys read
    (see :func:`course_lib.models.attention.paged_attention`). No checks: the engine built
    the inputs. ``q`` [B, H, D] -> [B, H, D]. ``max_context``: the longest context, when the
    caller knows it on the host (else it is read from ``context_lens``: a device sync).
    """
    B, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    lens = context_lens.long()
    n = _cdiv(int(lens.max()) if max_context is None else max_context, bs)
    table = block_tables[:, :n].long().clamp(0, k_cache.shape[0] - 1).reshape(-1)  # padding: masked
    compute = q.dtype if q.device.type == "cuda" else torch.float32
    k, v = (c.index_select(0, table).view(B, n * bs, Hkv, D).transpose(1, 2).to(compute)
            for c in (k_cache, v_cache))
    visible = torch.arange(n * bs, device=q.device)[None, :] < lens[:, None]  # [B, T]
    out = F.scaled_dot_product_attention(q[:, :, None, :].to(compute), k, v,
                                         attn_mask=visible[:, None, None, :], scale=scale,
                                         enable_gqa=Hkv != H)
    return out[:, :, 0, :].to(q.dtype)


# ------------------------------------------------------------------ Triton kernels


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, H, D,
                     s_kn, s_kh, s_kd, s_vn, s_vh, s_vd,
                     s_kcb, s_kct, s_kch, s_kcd, s_vcb, s_vct, s_vch, s_vcd,
                     BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)  # token
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # a tile of heads
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    keep = (tl.zeros((BLOCK_H,), tl.int64) + slot) >= 0  # slot < 0: skip the token
    mask = (keep & (offs_h < H))[:, None] & (offs_d[None, :] < D)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h, d = offs_h[:, None], offs_d[None, :]
    k = tl.load(key_ptr + i * s_kn + h * s_kh + d * s_kd, mask=mask)
    v = tl.load(value_ptr + i * s_vn + h * s_vh + d * s_vd, mask=mask)
    tl.store(k_cache_ptr + block * s_kcb + offset * s_kct + h * s_kch + d * s_kcd, k, mask=mask)
    tl.store(v_cache_ptr + block * s_vcb + offset * s_vct + h * s_vch + d * s_vcd, v, mask=mask)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, context_lens_ptr,
                         o_ptr, lse_ptr, scale, H, D, GROUP,
                         s_qb, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd, s_table,
                         BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # one program per (sequence, KV head, split): the GROUP query heads that share the KV head
    # are served together, so each key and value is read from memory once for all of them
    b, kv_h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_splits = tl.num_programs(2)
    context_len = tl.load(context_lens_ptr + b)
    # this split's share of the sequence: whole blocks, the last split may get fewer or none
    blocks_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_SIZE), num_splits)
    start = s * blocks_per_split * BLOCK_SIZE
    end = tl.minimum(start + blocks_per_split * BLOCK_SIZE, context_len)

    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < GROUP, offs_d < D
    heads = kv_h * GROUP + offs_g  # query heads h with h // GROUP == kv_h
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(tl.float32) * scale  # [BLOCK_G, BLOCK_D]
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max of each head's scores
    denom = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp(score - m): l above
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)  # running sum of exp(score - m) * v
    for t0 in range(start, end, BLOCK_N):  # a tile of BLOCK_N tokens, through the block table
        t = t0 + tl.arange(0, BLOCK_N)  # logical token positions
        t_mask = t < end
        block = tl.load(table_ptr + b * s_table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        offset = t % BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * s_kb + offset[:, None] * s_kt + kv_h * s_kh
                    + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + block[:, None] * s_vb + offset[:, None] * s_vt + kv_h * s_vh
                    + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max
        p = tl.exp(scores - m_new[:, None])
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        denom = denom * alpha + tl.sum(p, axis=1)
        m = m_new

    # an empty split (denom = 0) writes o = 0 and lse = -inf: it gets weight 0 in the merge
    d_safe = tl.where(denom > 0, denom, 1.0)
    row = (b * H + heads) * num_splits + s  # partial output [B, H, S, D], lse [B, H, S]
    tl.store(o_ptr + row[:, None] * D + offs_d[None, :], (acc / d_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + row, tl.where(denom > 0, m + tl.log(d_safe), float("-inf")), mask=g_mask)


@triton.jit
def _merge_splits_kernel(o_part_ptr, lse_ptr, out_ptr, H, D, NUM_SPLITS,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_mask, d_mask = offs_s < NUM_SPLITS, offs_d < D
    row = (b * H + h) * NUM_SPLITS
    lse = tl.load(lse_ptr + row + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)  # finite: every sequence has a token, so some split is non-empty
    w = tl.exp(lse - lse_max)  # exp(lse_s - lse) up to the common factor sum(w)
    o = tl.load(o_part_ptr + (row + offs_s[:, None]) * D + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + (b * H + h) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# ------------------------------------------------------------------ checks


def _check_cache(k_cache, v_cache, name: str) -> None:
    _check_float(k_cache, "k_cache", name)
    _check_float(v_cache, "v_cache", name)
    if k_cache.dim() != 4:
        raise ValueError(f"{name}: k_cache must be 4-D [num_blocks, block_size, Hkv, D], "
                         f"got shape {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: v_cache must have k_cache's shape {list(k_cache.shape)}, "
                         f"got {list(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{name}: v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")


def _check_heads(q, k_cache, name: str) -> None:
    """The cache's KV heads must divide q's heads (grouped-query attention), head sizes equal."""
    H, D = q.shape[1:]
    Hkv, Dk = k_cache.shape[2:]
    if Dk != D or Hkv < 1 or H % Hkv:
        raise ValueError(f"{name}: k_cache must be [num_blocks, block_size, Hkv, D] with q's D = {D} "
                         f"and Hkv dividing q's H = {H} (query head h reads KV head h // (H / Hkv)), "
                         f"got {list(k_cache.shape)}")


def _check_int(t, arg: str, name: str, dim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in INT_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: {arg} must be an int32 or int64 tensor {shape_doc}, got {got}")
    if t.dim() != dim:
        raise ValueError(f"{name}: {arg} must be {dim}-D {shape_doc}, got shape {list(t.shape)}")


def _check_store(key, value, k_cache, v_cache, slot_mapping) -> None:
    name = "store_kv"
    _check_cache(k_cache, v_cache, name)
    _, block_size, Hkv, D = k_cache.shape
    for arg, t in (("key", key), ("value", value)):
        _check_float(t, arg, name)
        if t.dim() != 3 or tuple(t.shape[1:]) != (Hkv, D):
            raise ValueError(f"{name}: {arg} must be [N, Hkv, D] = [N, {Hkv}, {D}] to match the cache, "
                             f"got {list(t.shape)}")
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{name}: {arg} dtype {t.dtype} must equal the cache dtype {k_cache.dtype}")
    if value.shape != key.shape:
        raise ValueError(f"{name}: value must have key's shape {list(key.shape)}, got {list(value.shape)}")
    _check_int(slot_mapping, "slot_mapping", name, 1, "[N]")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"{name}: slot_mapping must have N = {key.shape[0]} entries (one per token), "
                         f"got {slot_mapping.shape[0]}")


def _check_store_values(k_cache, slot_mapping) -> None:
    """The check that reads slot_mapping's values (a GPU sync)."""
    name = "store_kv"
    slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.numel() and int(slot_mapping.max()) >= slots:
        raise ValueError(f"{name}: slot_mapping entries must be < num_blocks * block_size = {slots} "
                         f"(negative = skip), got {int(slot_mapping.max())}")


def _check_decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits) -> None:
    name = "paged_decode_attention"
    _check_float(q, "q", name)
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be 3-D [B, H, D] (one query per sequence), got {list(q.shape)}")
    B, H, D = q.shape
    _check_cache(k_cache, v_cache, name)
    _check_heads(q, k_cache, name)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"{name}: q dtype {q.dtype} must equal the cache dtype {k_cache.dtype}")
    _check_int(block_tables, "block_tables", name, 2, "[B, max_blocks]")
    _check_int(context_lens, "context_lens", name, 1, "[B]")
    if block_tables.shape[0] != B or context_lens.shape[0] != B:
        raise ValueError(f"{name}: block_tables and context_lens need B = {B} rows (q's batch), "
                         f"got {block_tables.shape[0]} and {context_lens.shape[0]}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0):
        raise ValueError(f"{name}: scale must be None (1/sqrt(D)) or a positive number, got {scale!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{name}: num_splits must be None (automatic) or an int >= 1, got {num_splits!r}")


def _check_decode_values(block_tables, context_lens, num_blocks: int, block_size: int) -> None:
    """Checks that read the tensors' values: one device-to-host read for all (a GPU sync)."""
    name = "paged_decode_attention"
    if context_lens.numel() == 0:
        return
    capacity = block_tables.shape[1] * block_size
    needed = (torch.arange(block_tables.shape[1], device=block_tables.device)[None, :]
              < (context_lens.long()[:, None] + block_size - 1) // block_size)
    bad_ids = needed & ((block_tables < 0) | (block_tables >= num_blocks))
    stats = torch.stack([context_lens.min().long(), context_lens.max().long(), bad_ids.any().long()])
    lo, hi, any_bad = stats.tolist()
    if lo < 1 or hi > capacity:
        raise ValueError(f"{name}: context_lens must be in 1..{capacity} (max_blocks = "
                         f"{block_tables.shape[1]} blocks of {block_size}), got min {lo}, max {hi}")
    if any_bad:
        row, col = (int(i) for i in bad_ids.nonzero()[0])
        raise ValueError(f"{name}: block_tables[{row}, {col}] = {int(block_tables[row, col])} is used "
                         f"(context_lens[{row}] = {int(context_lens[row])}) but is not a block id in "
                         f"0..{num_blocks - 1}")


# ------------------------------------------------------------------ launchers


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend=None, *, validate: bool = True) -> None:
    """Write new tokens' keys and values into their cache slots, in place.

    Args:
        key, value: ``[N, Hkv, D]`` (any strides, e.g. slices of a fused qkv projection), the
            cache's dtype.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, written in place.
        slot_mapping: ``[N]`` int64 (or int32) slots ``physical_block * block_size + offset``;
            a negative slot skips its token (padding).
        backend: None (Triton where it runs, else the torch twin), "triton" or "torch".
        validate: check that no slot is past the cache's end (reads ``slot_mapping``: one device
            sync on the GPU); an engine that builds the mapping itself can pass False.
    """
    _check_store(key, value, k_cache, v_cache, slot_mapping)
    use_triton = _use_triton(backend, key, value, k_cache, v_cache, slot_mapping, name="store_kv")
    if validate:
        _check_store_values(k_cache, slot_mapping)
    store_kv_unchecked(key, value, k_cache, v_cache, slot_mapping, use_triton)


def store_kv_unchecked(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor, use_triton: bool) -> None:
    """:func:`store_kv` without its checks, for a model whose engine built and checked the
    inputs once per step (the per-layer hot path)."""
    if not use_triton:
        return store_kv_reference(key, value, k_cache, v_cache, slot_mapping)
    N = key.shape[0]
    _, block_size, H, D = k_cache.shape
    if N == 0:
        return None
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // block_d))
    grid = (N, triton.cdiv(H, block_h))
    _store_kv_kernel[grid](key, value, k_cache, v_cache, slot_mapping.contiguous(), H, D,
                           *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
                           BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_D=block_d)
    return None


def pick_num_splits(batch: int, heads: int, max_context: int, device: torch.device) -> int:
    """Splits of the KV length per (sequence, KV head) when ``num_splits`` is None.

    The rule: aim for ``PROGRAMS_PER_SM`` (4) programs per streaming multiprocessor, so that
    ``batch * heads * splits`` programs (``heads``: KV heads, one program serves a group) keep the GPU's memory system busy; but give every split
    at least ``MIN_TOKENS_PER_SPLIT`` (256) tokens of the longest possible context and use at
    most ``MAX_SPLITS`` (32). Big batches get 1 split (nothing to merge); one long sequence gets
    many. ``max_context`` is the table's capacity ``max_blocks * block_size`` (known without
    reading ``context_lens`` from the GPU). On the CPU (interpreter) there is nothing to fill: 1.
    """
    if device.type != "cuda":
        return 1
    return splits_for(batch, heads, max_context, torch.cuda.get_device_properties(device).multi_processor_count)


def splits_for(batch: int, heads: int, max_context: int, sms: int) -> int:
    """The rule of :func:`pick_num_splits` for a GPU with ``sms`` streaming multiprocessors."""
    wanted = _cdiv(PROGRAMS_PER_SM * sms, max(1, batch * heads))
    return max(1, min(wanted, _cdiv(max_context, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def _decode_config(head_dim: int, group: int) -> dict:
    """Tile of BLOCK_N tokens x BLOCK_D dims for BLOCK_G query heads (the group, padded to a power
    of two): about 4096 float32 values per [BLOCK_G, BLOCK_N, BLOCK_D] product, at least 16 tokens."""
    block_d, block_g = triton.next_power_of_2(head_dim), triton.next_power_of_2(group)
    return dict(BLOCK_G=block_g, BLOCK_N=max(16, min(64, 4096 // (block_d * block_g))),
                BLOCK_D=block_d, num_warps=4)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale=None,
                           num_splits=None, backend=None, *, validate: bool = True) -> torch.Tensor:
    """Decode attention over a paged KV cache (flash-decoding), ``[B, H, D]`` in q's dtype.

    Args:
        q: ``[B, H, D]``, one new query per sequence (float16, bfloat16 or float32).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype; any block size; ``Hkv``
            divides ``H`` (query head h reads KV head ``h // (H / Hkv)``).
        block_tables: ``[B, max_blocks]`` int32 (or int64); row i lists sequence i's physical
            blocks in logical order. Entries past ``ceil(context_lens[i] / block_size)`` are
            padding (any value, e.g. -1) and never read.
        context_lens: ``[B]`` int32 (or int64), each >= 1: the cached tokens of each sequence,
            the current one included (its K/V already stored by :func:`store_kv`).
        scale: softmax scale; None means ``1 / sqrt(D)``.
        num_splits: programs per (sequence, head) along the KV length; None picks with
            :func:`pick_num_splits`. Splits that get no tokens are allowed.
        backend: None (Triton where it runs, else the torch twin), "triton" or "torch".
        validate: check ``context_lens`` and the used table entries (one device sync on the GPU);
            an engine that built them itself can pass False.
    """
    _check_decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    use_triton = _use_triton(backend, q, k_cache, v_cache, block_tables, context_lens,
                             name="paged_decode_attention")  # also checks: one device
    if validate:
        _check_decode_values(block_tables, context_lens, *k_cache.shape[:2])
    return paged_decode_attention_unchecked(q, k_cache, v_cache, block_tables, context_lens, scale,
                                            num_splits, use_triton)


def paged_decode_attention_unchecked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale=None, num_splits=None,
                                     use_triton: bool = True) -> torch.Tensor:
    """:func:`paged_decode_attention` without its checks (the model's per-layer hot path)."""
    if not use_triton:
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    B, H, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    if B == 0:
        return torch.empty_like(q)
    scale = D**-0.5 if scale is None else float(scale)
    splits = num_splits or pick_num_splits(B, Hkv, block_tables.shape[1] * block_size, q.device)
    cfg = _decode_config(D, H // Hkv)
    # under the interpreter bfloat16 is rounded by torch, not by the kernel
    out_dtype = torch.float32 if interpreter_bf16_workaround(q.dtype) else q.dtype
    out = torch.empty(B, H, D, device=q.device, dtype=out_dtype)
    lse = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    # one split: the kernel's normalised partial output is the output ([B, H, 1, D] = [B, H, D])
    o_part = out if splits == 1 else torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse, scale, H, D, H // Hkv,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        BLOCK_SIZE=block_size, **cfg)
    if splits > 1:
        _merge_splits_kernel[(B, H)](o_part, lse, out, H, D, splits,
                                     BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=cfg["BLOCK_D"])
    return out.to(q.dtype)


def _as_int_list(x, arg: str, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dim() != 1:
            raise TypeError(f"{name}: {arg} must be a list of ints or a 1-D int tensor, got "
                            f"{x.dtype} of shape {list(x.shape)}")
        return [int(v) for v in x.tolist()]
    if not isinstance(x, list | tuple) or not all(isinstance(v, int) for v in x):
        raise TypeError(f"{name}: {arg} must be a list of ints or a 1-D int tensor, got {x!r}")
    return list(x)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens, query_lens,
                            scale=None, *, validate: bool = True) -> torch.Tensor:
    """Causal attention for prompt (or prompt-chunk) tokens whose K/V are already in the cache.

    Torch only, by design: with many queries per sequence, prefill is compute-bound and
    ``F.scaled_dot_product_attention`` already runs a fused (flash) kernel; the one paged step is
    gathering each sequence's keys and values from its blocks (:func:`gather_kv`), a copy that
    is small next to the attention's O(L^2) work.

    Args:
        q: ``[N_total, H, D]``: the queries of several sequences concatenated; sequence i gives
            ``query_lens[i]`` of them, the *last* ``query_lens[i]`` positions of its context.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype, ``Hkv`` dividing ``H``.
        block_tables: ``[B, max_blocks]`` int tensor, as for :func:`paged_decode_attention`.
        context_lens: ``B`` ints (list or int tensor): tokens in the cache per sequence, the
            new ones included.
        query_lens: ``B`` ints, each in 1..context_lens[i]; fewer than the context for chunked
            prefill (earlier chunks already cached).
        scale: softmax scale; None means ``1 / sqrt(D)``.
        validate: check that the used block-table entries are valid block ids (reads the table:
            a device sync on the GPU); the engine, which built the table, passes False.

    Returns ``[N_total, H, D]``: query at position p attends to keys 0..p of its own sequence.
    """
    name = "paged_prefill_attention"
    _check_float(q, "q", name)
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be 3-D [N_total, H, D], got shape {list(q.shape)}")
    _check_cache(k_cache, v_cache, name)
    _check_heads(q, k_cache, name)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"{name}: q dtype {q.dtype} must equal the cache dtype {k_cache.dtype}")
    _check_int(block_tables, "block_tables", name, 2, "[B, max_blocks]")
    ctx, qlens = _as_int_list(context_lens, "context_lens", name), _as_int_list(query_lens, "query_lens", name)
    B = block_tables.shape[0]
    if len(ctx) != B or len(qlens) != B:
        raise ValueError(f"{name}: context_lens and query_lens need B = {B} entries (block_tables' rows), "
                         f"got {len(ctx)} and {len(qlens)}")
    for i, (L, n) in enumerate(zip(ctx, qlens, strict=True)):
        if not 1 <= n <= L:
            raise ValueError(f"{name}: query_lens[{i}] must be in 1..context_lens[{i}] = {L}, got {n}")
    if sum(qlens) != q.shape[0]:
        raise ValueError(f"{name}: q must have sum(query_lens) = {sum(qlens)} rows, got {q.shape[0]}")
    tables, bs = block_tables.long(), k_cache.shape[1]
    if max(_cdiv(L, bs) for L in ctx) > tables.shape[1]:
        raise ValueError(f"{name}: block_tables has {tables.shape[1]} columns, fewer than "
                         f"ceil(max(context_lens) / block_size) = {_cdiv(max(ctx), bs)}")
    if validate:  # every used entry a valid block id, all rows at once
        used = torch.arange(tables.shape[1], device=tables.device)[None, :] < torch.tensor(
            [_cdiv(L, bs) for L in ctx], device=tables.device)[:, None]
        invalid = bool(((tables < 0) | (tables >= k_cache.shape[0]))[used].any())
    if validate and invalid:
        raise ValueError(f"{name}: block_tables must hold ceil(context_lens / block_size) valid "
                         f"block ids (0..{k_cache.shape[0] - 1}) per row")
    return paged_prefill_attention_unchecked(q, k_cache, v_cache, tables, ctx, qlens, scale)


def paged_prefill_attention_unchecked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_tables: torch.Tensor, context_lens: list[int],
                                      query_lens: list[int], scale=None) -> torch.Tensor:
    """:func:`paged_prefill_attention` without its checks: ``context_lens`` and ``query_lens``
    are lists of ints (the model's per-layer hot path)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # SDPA in the inputs' dtype on the GPU; float32 on the CPU (half matmuls are slow there)
    compute = q.dtype if q.device.type == "cuda" else torch.float32
    tables, bs, ctx, qlens = block_tables, k_cache.shape[1], context_lens, query_lens
    same, gqa = compute == q.dtype, k_cache.shape[2] != q.shape[1]

    outs, first = [], 0
    for i, (L, n) in enumerate(zip(ctx, qlens, strict=True)):
        k, v = _gather(k_cache, v_cache, tables[i, :_cdiv(L, bs)], L)  # [L, Hkv, D]
        qi = q[first:first + n]
        first += n
        # query j sits at position L - n + j and sees keys 0..L - n + j: no mask for a single
        # (decode) query, SDPA's own causal mask for a whole prompt, an explicit one for a chunk
        causal, visible = n == L and n > 1, None
        if 1 < n < L:
            visible = (torch.arange(L, device=q.device)[None, :]
                       <= torch.arange(L - n, L, device=q.device)[:, None])
        # [1, H, n, D] views: SDPA takes a 4-D batch of one far faster than 3-D input on a CPU
        qi, k, v = (t.transpose(0, 1)[None] if same else t.transpose(0, 1)[None].to(compute)
                    for t in (qi, k, v))
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=visible, is_causal=causal, scale=scale,
                                           enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1) if same else o[0].transpose(0, 1).to(q.dtype))  # [n, H, D]
    return torch.cat(outs) if outs else q.new_empty(q.shape)
