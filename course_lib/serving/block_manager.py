"""The block manager: a fixed pool of KV-cache blocks handed out to sequences as they grow.

This is vLLM's answer to KV-cache fragmentation. Instead of reserving ``max_len`` slots per
request up front, the cache is cut into blocks of ``block_size`` token slots; a sequence owns a
*block table* (logical block i -> physical block id) and gets one more block only when its last
one is full, so at most ``block_size - 1`` slots per sequence sit empty.

Three ideas on top of the free list:

- **Reference counts.** A block may be shared: by sequences with a common prefix (prefix
  caching) or by the samples of one prompt (:meth:`fork`). It returns to the free list when
  its count drops to 0, never earlier (no double free, no leak).
- **Copy-on-write.** A sequence about to write into a shared block first gets a private copy
  of it: :meth:`append_slot` returns ``(src, dst)`` for *every* shared block the step writes
  (a chunk forked mid-prefill may span several) and the engine copies the K/V.
- **Prefix caching over full blocks.** A full block is identified by a *chained* hash,
  ``hash((hash of the previous block, its token ids))``, so equal hashes mean equal prefixes.
  A new sequence whose first blocks hash the same reuses them (token ids are compared too, in
  case of a hash collision). Only blocks whose K/V have been computed are published
  (:meth:`mark_computed`), and a freed block keeps its hash until it is reused, so a later
  request can still hit it (the free list is evicted oldest first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from course_lib.models.paged import check_block_size
from course_lib.serving.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed (prefix caching)
    token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The prefix-caching key of a full block: its tokens *and* everything before them."""
    return hash((prev_hash, token_ids))


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` slots; allocate, append, fork and free sequences."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        check_block_size(block_size)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # full prompt blocks looked up in the prefix cache
        self.prefix_hits = 0  # ... and found there

    # ---------------------------------------------------------------- sizes
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner (some still hold cached prefixes and can be hit or evicted)."""
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    # ---------------------------------------------------------------- allocation
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks holding the longest cached prefix of ``seq``'s tokens.

        Only blocks that lie entirely before the last token count: the last token is always
        computed again, so the step that finishes the prompt has logits to sample from. The
        scheduler looks them up once per admission and hands them to :meth:`can_allocate` and
        :meth:`allocate` (vLLM's ``get_computed_blocks`` -> ``allocate_slots``), so the chain of
        hashes is walked once, not once per call.
        """
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            prev = chain_hash(prev, tokens)
            block_id = self.hash_to_block.get(prev)
            if block_id is None or block_id in hits or self.blocks[block_id].token_ids != tokens:
                break  # not cached, or a hash collision (a block can't stand at two positions)
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        """True when there are blocks for all of ``seq``'s current tokens (prefix hits included).

        ``hits``: what :meth:`cached_prefix` returned for ``seq`` (looked up here when omitted).
        """
        hits = self.cached_prefix(seq) if hits is None else hits
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return fresh + reused_free <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int] | None = None) -> None:
        """Give ``seq`` (holding no blocks) a block table for its tokens, reusing cached prefixes.

        ``hits``: :meth:`cached_prefix` of ``seq`` with no block taken or freed since (looked up
        here when omitted). Sets ``seq.num_cached_tokens`` and ``seq.num_computed_tokens`` to
        the tokens found in the cache: the scheduler computes only the rest.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id} already holds blocks {seq.block_table}")
        hits = self.cached_prefix(seq) if hits is None else hits
        if not self.can_allocate(seq, hits):
            raise RuntimeError(f"not enough free blocks for sequence {seq.request_id} "
                               f"({seq.num_tokens} tokens, {self.num_free_blocks} blocks free)")
        if self.enable_prefix_caching:
            self.prefix_queries += (seq.num_tokens - 1) // self.block_size
            self.prefix_hits += len(hits)
        for block_id in hits:
            self._take(block_id)
        fresh = [self._take_fresh() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """The least recently freed block, its cached prefix (if any) evicted."""
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _shared_blocks_written(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Logical indices of the blocks ``seq``'s next ``num_new_tokens`` tokens are written to
        that another sequence also owns: each needs its own copy before the step writes.

        All of them, not just the first: a sequence forked in the middle of a chunked prefill
        shares every block of its prompt, and its next chunk may run through several.
        """
        if num_new_tokens < 1:
            return []
        start = seq.num_computed_tokens
        first = start // self.block_size  # block the first new token goes to
        end = min(self.blocks_needed(start + num_new_tokens), len(seq.block_table))
        return [i for i in range(first, end) if self.blocks[seq.block_table[i]].ref_count > 1]

    def _slots_short(self, seq: Sequence, num_new_tokens: int) -> tuple[int, list[int]]:
        """(blocks to add at the end, logical indices of the shared blocks to copy-on-write)."""
        new_blocks = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(new_blocks, 0), self._shared_blocks_written(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """True when ``seq`` can get slots for its next ``num_new_tokens`` computed tokens
        (a fresh block for each new one and for each shared block to copy)."""
        new_blocks, to_copy = self._slots_short(seq, num_new_tokens)
        return new_blocks + len(to_copy) <= self.num_free_blocks

    def append_slot(self, seq: Sequence, num_new_tokens: int = 1) -> list[tuple[int, int]]:
        """Make room for ``seq``'s next ``num_new_tokens`` tokens (from ``num_computed_tokens``).

        Returns the copy-on-write copies ``[(src, dst)]`` the engine must apply to the K/V cache
        before writing: one for each block being written that was shared, none otherwise.
        """
        if not self.can_append(seq, num_new_tokens):
            raise RuntimeError(f"no free block to extend sequence {seq.request_id}")
        new_blocks, to_copy = self._slots_short(seq, num_new_tokens)
        copies = []
        for i in to_copy:
            src = seq.block_table[i]
            dst = self._take_fresh()
            self.blocks[src].ref_count -= 1  # still > 0: another sequence owns it
            seq.block_table[i] = dst
            copies.append((src, dst))
        seq.block_table.extend(self._take_fresh() for _ in range(new_blocks))
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks (parallel sampling of one prompt)."""
        if child.block_table:
            raise ValueError(f"sequence {child.request_id} already holds blocks")
        for block_id in parent.block_table:
            self._take(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody else uses return to the free list."""
        for block_id in seq.block_table:  # check all first: a double free changes nothing
            if self.blocks[block_id].ref_count < 1:
                raise RuntimeError(f"double free of block {block_id} by sequence {seq.request_id}")
        for block_id in reversed(seq.block_table):  # the tail is evicted before the prefix
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []

    def mark_computed(self, seq: Sequence) -> None:
        """Publish ``seq``'s full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full == 0 or self.blocks[seq.block_table[full - 1]].hash is not None:
            return  # blocks are published in order: the last full one has a hash, so all do
        prev = None
        for i in range(full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                block.hash, block.token_ids = chain_hash(prev, tokens), tokens
                self.hash_to_block.setdefault(block.hash, block.block_id)
            prev = block.hash

    # ---------------------------------------------------------------- usage figures
    def usage(self, seqs: list[Sequence] | None = None) -> dict[str, float]:
        """Blocks used, utilisation, and (given the live sequences) tokens stored and the slots
        left empty in their last blocks (internal fragmentation)."""
        out = {"num_blocks": self.num_blocks, "blocks_used": self.num_used_blocks,
               "utilization": self.num_used_blocks / self.num_blocks,
               "prefix_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0}
        if seqs is not None:
            slots = sum(len(s.block_table) for s in seqs) * self.block_size
            tokens = sum(min(s.num_tokens, len(s.block_table) * self.block_size) for s in seqs)
            out.update(tokens_stored=tokens, fragmentation_tokens=slots - tokens,
                       fragmentation=(slots - tokens) / slots if slots else 0.0)
        return out
