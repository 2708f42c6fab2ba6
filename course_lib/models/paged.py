"""The paged KV cache and the per-step metadata that lets one forward pass serve many sequences.

A contiguous cache (chapter 4) gives each sequence one [max_len] slab, reserved up front. The
paged cache (chapter 6, vLLM's PagedAttention) cuts every layer's keys and values into fixed
*blocks* of ``block_size`` token slots, [num_blocks, block_size, kv_heads, head_dim]; a sequence
owns a list of blocks (its *block table*, logical block i -> physical block), handed out by
:class:`course_lib.serving.block_manager.BlockManager` as it grows.

One engine step runs every scheduled sequence in a single forward pass: their new tokens are
concatenated into one row ``[1, N]`` and :class:`PagedAttentionMetadata` tells attention where
each token goes (``slot_mapping``) and which cached tokens each sequence sees (``block_tables``,
``context_lens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class PagedKVCache:
    """Keys and values of every layer: ``k[layer]`` / ``v[layer]`` are [num_blocks, block_size,
    Hkv, D], the model's *key/value* heads only: a grouped-query model (SmolLM2: 9 query heads
    sharing 3 KV heads) needs ``H / Hkv`` times less memory per token than one KV head per query
    head would."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        check_block_size(block_size)
        for name, value in (("num_blocks", num_blocks), ("n_layer", n_layer),
                            ("n_kv_head", n_kv_head), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        """A paged cache shaped for ``model`` (:class:`~course_lib.models.gpt.GPT` or
        :class:`~course_lib.models.llama.Llama`), in its dtype and on its device."""
        c, w = model.config, next(model.parameters())
        return cls(c.n_layer, num_blocks, block_size, c.n_kv_head, c.head_dim, w.dtype, w.device)

    @staticmethod
    def bytes_per_block(model, block_size: int = 16) -> int:
        """Bytes one block takes across all layers (keys and values of the KV heads)."""
        from course_lib.generation.generate import kv_cache_bytes_for  # the formula's one home

        return kv_cache_bytes_for(model.config, tokens=block_size,
                                  dtype_bytes=next(model.parameters()).element_size())

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one physical block (all layers) onto another: the engine's copy-on-write."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def check_block_size(block_size: int) -> None:
    """Block sizes are positive powers of two (the kernels tile by them)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two (1, 2, 4, ... 16 ...), "
                         f"got {block_size!r}")


def slot_mapping(block_table: Sequence[int], start: int, num_tokens: int, block_size: int) -> list[int]:
    """Cache slots of positions ``start .. start + num_tokens - 1`` of one sequence.

    Position p lives in logical block ``p // block_size`` at offset ``p % block_size``; the block
    table maps the logical block to a physical one, so the slot is
    ``block_table[p // block_size] * block_size + p % block_size``.
    """
    if (start + num_tokens + block_size - 1) // block_size > len(block_table):
        raise ValueError(f"a block table of {len(block_table)} blocks of {block_size} cannot hold "
                         f"{start + num_tokens} tokens")
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start, start + num_tokens)]


@dataclass
class PagedAttentionMetadata:
    """Where a step's N new tokens come from and go, for S sequences.

    - ``positions`` [N]: each token's position in its sequence (for the position embedding).
    - ``slot_mapping`` [N]: the cache slot each token's K/V is written to
      (``physical_block * block_size + offset``).
    - ``block_tables`` [S, max_blocks] int32, padded with -1; ``context_lens`` [S] int32: tokens
      each sequence attends to after this step's writes; ``query_lens``: new tokens per sequence.
    - ``logits_indices`` [S]: the row of each sequence's last new token, the only logits needed.
    - ``context_lens_host``: ``context_lens`` as Python ints, built once per step with the rest,
      so that no layer reads a device tensor back to the host (a sync on a GPU, per layer).
    """

    cache: PagedKVCache
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_lens: list[int]
    logits_indices: torch.Tensor
    backend: str | None = None
    context_lens_host: list[int] | None = None
    decode_groups: list | None = None  # the torch decode path's calls, made once per step

    num_decodes: int = field(init=False)
    use_triton: bool = field(init=False)
    tensors_only = False  # class-level: see DecodeBatchMetadata

    def __post_init__(self) -> None:
        """Host-side values every layer needs, computed once per step: ``num_decodes``, how many
        leading sequences bring exactly one new token (the decode kernel serves them, since the
        scheduler puts decodes first; the prefill path the rest), and ``use_triton``, the
        kernels' backend resolved from ``backend`` (None: Triton where it runs)."""
        from course_lib.kernels.quant import _use_triton  # the backend rule's one home

        self.num_decodes = next((i for i, n in enumerate(self.query_lens) if n != 1),
                                len(self.query_lens))
        self.use_triton = _use_triton(self.backend, self.cache.k, name="paged attention")

    @classmethod
    def build(cls, cache: PagedKVCache, block_tables: Sequence[Sequence[int]],
              start_positions: Sequence[int], query_lens: Sequence[int],
              backend: str | None = None) -> PagedAttentionMetadata:
        """Metadata for sequences whose new tokens sit at ``start .. start + query_len - 1``."""
        bs = cache.block_size
        positions, slots, logits_indices = [], [], []
        for table, start, n in zip(block_tables, start_positions, query_lens, strict=True):
            positions.extend(range(start, start + n))
            slots.extend(slot_mapping(table, start, n, bs))
            logits_indices.append(len(positions) - 1)
        width = max(1, max(len(t) for t in block_tables))
        tables = torch.full((len(block_tables), width), -1, dtype=torch.int32)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        device = cache.k.device
        contexts = [s + n for s, n in zip(start_positions, query_lens, strict=True)]
        return cls(cache=cache,
                   positions=torch.tensor(positions, dtype=torch.long, device=device),
                   slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                   block_tables=tables.to(device),
                   context_lens=torch.tensor(contexts, dtype=torch.int32, device=device),
                   query_lens=list(query_lens),
                   logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=device),
                   backend=backend, context_lens_host=contexts)


@dataclass
class DecodeBatchMetadata(PagedAttentionMetadata):
    """A decode-only step as tensors alone, for a compiled forward (``torch.compile``): one new
    token per row, ``block_tables`` [B, W] cut to a fixed width, rows padded to a fixed batch
    with a scratch slot. No Python list, no host-side int that changes from step to step, so
    the traced graph is reused (see :mod:`course_lib.serving.compiled_decode`). Rows beyond the
    real batch write their K/V into a scratch block no sequence owns and their logits are
    dropped."""

    tensors_only = True  # paged_attention takes decode_attention_tensors for this metadata
    new_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer

    def __post_init__(self) -> None:  # nothing host-side to compute: the graph must not see it
        self.num_decodes = 0
        self.use_triton = False

    def store_new_kv(self) -> None:
        """Write every layer's new K/V (collected by the forward pass) into the cache at
        ``slot_mapping``, one indexed copy for all layers."""
        k = torch.stack([k for k, _ in self.new_kv])  # [layers, B, Hkv, D]
        v = torch.stack([v for _, v in self.new_kv])
        n_layer, _, bs, Hkv, D = self.cache.k.shape
        self.cache.k.view(n_layer, -1, Hkv, D)[:, self.slot_mapping] = k.to(self.cache.k.dtype)
        self.cache.v.view(n_layer, -1, Hkv, D)[:, self.slot_mapping] = v.to(self.cache.v.dtype)
