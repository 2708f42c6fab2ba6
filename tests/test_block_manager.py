"""The block manager: ref counts, copy-on-write, prefix caching, no leak and no double free.

A hypothesis state machine drives random interleavings of what the scheduler does (allocate,
chunked prefill, decode with append_slot, fork, preempt by recompute, free) against a *shadow
KV cache*: every slot remembers which position and which prefix its K/V were computed for, so a
wrong prefix hit, a missing copy-on-write or a block reused while still owned shows up as a
sequence whose cached positions hold someone else's keys and values.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import course_lib.serving.block_manager as bm_module
from course_lib.models.paged import slot_mapping
from course_lib.serving.block_manager import BlockManager, chain_hash
from course_lib.serving.sequence import Sequence


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(list(tokens))


def compute(manager: BlockManager, seq: Sequence) -> None:
    """What the engine does for a prefill: slots for the pending tokens, then publish them."""
    assert manager.append_slot(seq, seq.num_pending_tokens) == []
    seq.num_computed_tokens = seq.num_tokens
    manager.mark_computed(seq)


def check_ref_counts(manager: BlockManager, live: list[Sequence]) -> None:
    owners = Counter(b for s in live for b in s.block_table)
    for block in manager.blocks:
        assert block.ref_count == owners[block.block_id], block
        assert (block.block_id in manager.free_blocks) == (block.ref_count == 0), block
    assert manager.num_free_blocks + manager.num_used_blocks == manager.num_blocks
    for h, b in manager.hash_to_block.items():
        assert manager.blocks[b].hash == h


# ------------------------------------------------------------------------------ state machine
class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Sequence] = []  # no blocks: new, or preempted (recompute)
        self.live: list[Sequence] = []  # holding blocks
        self.freed: list[Sequence] = []  # finished and freed
        self.prompts: list[list[int]] = []  # every prompt so far, to share prefixes with
        self.kv: dict[int, tuple[int, tuple[int, ...]]] = {}  # slot -> (position, prefix)
        self.cow_copies = 0

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 16),
                caching=st.booleans())
    def setup(self, block_size: int, num_blocks: int, caching: bool) -> None:
        self.bs = block_size
        self.m = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)

    # ---------------------------------------------------------------- helpers
    def write(self, seq: Sequence, start: int, end: int) -> None:
        """Compute positions start..end-1 of ``seq`` into its slots (the shadow K/V)."""
        slots = slot_mapping(seq.block_table, start, end - start, self.bs)
        for p, slot in zip(range(start, end), slots, strict=True):
            self.kv[slot] = (p, tuple(seq.token_ids[: p + 1]))

    def append_slot_checked(self, seq: Sequence, n: int) -> None:
        """append_slot, checking copy-on-write and applying its copies to the shadow K/V."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        written = range(start // self.bs, min(-(-end // self.bs), len(seq.block_table)))
        shared = [i for i in written if self.m.blocks[seq.block_table[i]].ref_count > 1]
        before = list(seq.block_table)
        copies = self.m.append_slot(seq, n)
        # every shared block the step writes is copied (not just the first), in table order
        assert copies == [(before[i], seq.block_table[i]) for i in shared]
        others = [s for s in self.live if s is not seq]
        for old, new in copies:
            self.cow_copies += 1
            assert any(old in s.block_table for s in others)  # src still owned by another
            assert old not in seq.block_table
            assert self.m.blocks[new].ref_count == 1  # dst owned by this sequence only
            assert not any(new in s.block_table for s in others)
            for o in range(self.bs):
                if old * self.bs + o in self.kv:
                    self.kv[new * self.bs + o] = self.kv[old * self.bs + o]
        assert [b for i, b in enumerate(seq.block_table[:len(before)]) if i not in shared] == \
            [b for i, b in enumerate(before) if i not in shared]  # nothing else moved
        assert len(seq.block_table) * self.bs >= end

    # ---------------------------------------------------------------- rules
    @rule(data=st.data(), tail=st.lists(st.integers(0, 1), min_size=0, max_size=8))
    def new_sequence(self, data, tail: list[int]) -> None:
        prefix: list[int] = []
        if self.prompts and data.draw(st.booleans(), label="share"):
            earlier = data.draw(st.sampled_from(self.prompts), label="earlier")
            cut = data.draw(st.one_of(st.just(len(earlier)), st.integers(0, len(earlier))),
                            label="cut")
            prefix = earlier[:cut]
        tokens = (prefix + tail) or [0]
        self.prompts.append(tokens)
        self.waiting.append(make_seq(tokens))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def allocate(self, data) -> None:
        seq = data.draw(st.sampled_from(self.waiting), label="seq")
        hits = self.m.cached_prefix(seq)
        given = hits if data.draw(st.booleans(), label="hand the hits over") else None
        if not self.m.can_allocate(seq, given):
            before = ([b.ref_count for b in self.m.blocks], list(self.m.free_blocks))
            with pytest.raises(RuntimeError, match="not enough free blocks"):
                self.m.allocate(seq, given)
            assert seq.block_table == []
            assert ([b.ref_count for b in self.m.blocks], list(self.m.free_blocks)) == before
            return
        self.m.allocate(seq, given)
        self.waiting.remove(seq)
        self.live.append(seq)
        assert len(seq.block_table) == self.m.blocks_needed(seq.num_tokens)
        assert seq.block_table[: len(hits)] == hits
        assert seq.num_cached_tokens == seq.num_computed_tokens == len(hits) * self.bs
        assert seq.num_cached_tokens < seq.num_tokens  # the last token is always computed
        if not self.m.enable_prefix_caching:
            assert hits == []

    @precondition(lambda self: any(s.num_pending_tokens for s in self.live))
    @rule(data=st.data())
    def prefill_chunk(self, data) -> None:
        seq = data.draw(st.sampled_from([s for s in self.live if s.num_pending_tokens]),
                        label="seq")
        n = data.draw(st.one_of(st.just(seq.num_pending_tokens),
                                st.integers(1, seq.num_pending_tokens)), label="chunk")
        if not self.m.can_append(seq, n):
            with pytest.raises(RuntimeError):
                self.m.append_slot(seq, n)
            return
        self.append_slot_checked(seq, n)
        start = seq.num_computed_tokens
        self.write(seq, start, start + n)
        seq.num_computed_tokens += n
        self.m.mark_computed(seq)

    @precondition(lambda self: any(not s.num_pending_tokens for s in self.live))
    @rule(data=st.data(), token=st.integers(0, 1))
    def decode(self, data, token: int) -> None:
        """Sample one token, give it a slot (it is computed by the next step: prefill_chunk)."""
        seq = data.draw(st.sampled_from([s for s in self.live if not s.num_pending_tokens]),
                        label="seq")
        seq.append_token(token, now=0.0)
        if self.m.can_append(seq, 1):
            self.append_slot_checked(seq, 1)
            assert len(seq.block_table) == self.m.blocks_needed(seq.num_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data) -> None:
        """Share the parent's blocks; the child's not yet computed tokens may differ (a fork in
        the middle of a chunked prefill that goes on with other tokens), so a write into a
        shared block without its copy shows up in the shadow K/V of the other owner."""
        parent = data.draw(st.sampled_from(self.live), label="parent")
        done = parent.num_computed_tokens
        tail = data.draw(st.lists(st.integers(0, 1), min_size=parent.num_tokens - done,
                                  max_size=parent.num_tokens - done), label="tail")
        child = make_seq(parent.token_ids[:done] + tail)
        self.m.fork(parent, child)
        assert child.block_table == parent.block_table
        assert child.block_table is not parent.block_table
        assert child.num_computed_tokens == parent.num_computed_tokens
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq = data.draw(st.sampled_from(self.live), label="seq")
        self.m.free(seq)
        assert seq.block_table == []
        self.live.remove(seq)
        self.freed.append(seq)
        self.prompts.append(list(seq.token_ids))  # its blocks stay cached: a later prompt may hit

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt(self, data) -> None:
        """Preemption by recompute: drop the blocks, compute everything again later."""
        seq = data.draw(st.sampled_from(self.live), label="seq")
        self.m.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self.live.remove(seq)
        self.waiting.append(seq)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def free_again(self, data) -> None:
        """Freeing a sequence twice is a no-op (its table is empty)."""
        self.m.free(data.draw(st.sampled_from(self.freed), label="seq"))

    # ---------------------------------------------------------------- invariants
    @invariant()
    def ref_counts_and_free_list(self) -> None:
        check_ref_counts(self.m, self.live)
        for seq in self.waiting + self.freed:
            assert seq.block_table == []

    @invariant()
    def tables(self) -> None:
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table), seq
            assert len(seq.block_table) * self.bs >= seq.num_computed_tokens, seq
            assert 0 <= seq.num_cached_tokens <= seq.num_computed_tokens <= seq.num_tokens
        for a in self.live:  # blocks shared by two sequences are counted by both
            for b in self.live:
                if a is not b:
                    for block in set(a.block_table) & set(b.block_table):
                        assert self.m.blocks[block].ref_count >= 2

    @invariant()
    def cached_blocks_hold_their_prefix(self) -> None:
        """A block with a hash is full, computed and holds the prefix its hash names."""
        for seq in self.live:
            prev = None
            for i, block_id in enumerate(seq.block_table[: seq.num_tokens // self.bs]):
                tokens = tuple(seq.token_ids[i * self.bs:(i + 1) * self.bs])
                prev = chain_hash(prev, tokens)
                block = self.m.blocks[block_id]
                if block.hash is not None:  # so whatever this sequence writes there is equal
                    assert block.hash == prev and block.token_ids == tokens

    @invariant()
    def kv_content(self) -> None:
        """Every computed position of every live sequence reads its own keys and values."""
        for seq in self.live:
            slots = slot_mapping(seq.block_table, 0, seq.num_computed_tokens, self.bs)
            for p, slot in enumerate(slots):
                assert self.kv.get(slot) == (p, tuple(seq.token_ids[: p + 1])), (seq, p)

    @invariant()
    def usage_figures(self) -> None:
        u = self.m.usage(self.live)
        assert u["blocks_used"] == self.m.num_used_blocks
        assert u["utilization"] == pytest.approx(self.m.num_used_blocks / self.m.num_blocks)
        slots = sum(len(s.block_table) for s in self.live) * self.bs
        tokens = sum(min(s.num_tokens, len(s.block_table) * self.bs) for s in self.live)
        assert u["fragmentation_tokens"] == slots - tokens >= 0
        assert 0.0 <= u["prefix_hit_rate"] <= 1.0

    def teardown(self) -> None:
        if not hasattr(self, "m"):
            return
        for seq in list(self.live):
            self.m.free(seq)
        self.freed += self.live
        self.live = []
        check_ref_counts(self.m, [])
        assert self.m.num_free_blocks == self.m.num_blocks  # no leak
        for seq in self.freed:  # a second free changes nothing
            self.m.free(seq)
        assert self.m.num_free_blocks == self.m.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_block_manager_state_machine = BlockManagerMachine.TestCase


# ------------------------------------------------------------------------------ unit tests
BS = 4


def computed_seq(manager: BlockManager, tokens: list[int]) -> Sequence:
    seq = make_seq(tokens)
    manager.allocate(seq)
    compute(manager, seq)
    return seq


@pytest.mark.parametrize("n, blocks", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed(n: int, blocks: int) -> None:
    assert BlockManager(4, BS).blocks_needed(n) == blocks


@pytest.mark.parametrize("n", [1, 3, 4, 5, 16, 17])
def test_allocate_takes_ceil_blocks(n: int) -> None:
    m = BlockManager(10, BS)
    seq = make_seq(list(range(n)))
    m.allocate(seq)
    assert len(seq.block_table) == -(-n // BS) == m.num_used_blocks
    assert len(set(seq.block_table)) == len(seq.block_table)
    assert seq.num_computed_tokens == seq.num_cached_tokens == 0


def test_default_block_size_is_16() -> None:
    assert BlockManager(4).block_size == 16


def test_prefix_hit_reuses_full_blocks_only_after_mark_computed() -> None:
    m = BlockManager(16, BS)
    shared = list(range(2 * BS))
    first = make_seq(shared + [100, 101])
    m.allocate(first)
    early = make_seq(shared + [200])
    m.allocate(early)  # first is not computed yet: nothing published, no hit
    assert early.num_cached_tokens == 0
    assert not set(early.block_table) & set(first.block_table)
    m.free(early)

    compute(m, first)
    second = make_seq(shared + [300, 301, 302])
    m.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert second.num_cached_tokens == second.num_computed_tokens == 2 * BS
    assert m.blocks[first.block_table[0]].ref_count == 2
    assert m.blocks[first.block_table[2]].ref_count == 1  # the partly filled tail is not shared
    check_ref_counts(m, [first, second])


def test_last_token_is_never_served_from_cache() -> None:
    m = BlockManager(8, BS)
    tokens = list(range(2 * BS))
    first = computed_seq(m, tokens)
    again = make_seq(tokens)  # identical, exactly 2 full blocks
    m.allocate(again)
    assert again.block_table[0] == first.block_table[0]
    assert again.block_table[1] != first.block_table[1]
    assert again.num_cached_tokens == BS
    assert again.num_pending_tokens == BS  # the last block, last token included, is recomputed


def test_prefix_must_match_from_the_start() -> None:
    """Equal blocks after a different first block are not hits (the hash is chained)."""
    m = BlockManager(8, BS)
    computed_seq(m, [0] * BS + [1] * BS + [9])
    other = make_seq([2] * BS + [1] * BS + [9])
    m.allocate(other)
    assert other.num_cached_tokens == 0


def test_hash_collision_rejected_by_token_comparison(monkeypatch) -> None:
    monkeypatch.setattr(bm_module, "chain_hash", lambda prev, tokens: 42)
    m = BlockManager(8, BS)
    first = computed_seq(m, [1, 2, 3, 4, 5])
    assert m.hash_to_block == {42: first.block_table[0]}
    other = make_seq([5, 6, 7, 8, 9])  # same (constant) hash, other tokens
    m.allocate(other)
    assert other.num_cached_tokens == 0
    assert not set(other.block_table) & set(first.block_table)
    same = make_seq([1, 2, 3, 4, 0])  # same tokens: a genuine hit
    m.allocate(same)
    assert same.block_table[0] == first.block_table[0] and same.num_cached_tokens == BS


def test_hash_collision_never_puts_a_block_twice_in_a_table(monkeypatch) -> None:
    """Under a colliding hash, equal token blocks at other positions are not hits."""
    monkeypatch.setattr(bm_module, "chain_hash", lambda prev, tokens: 42)
    m = BlockManager(8, BS)
    first = computed_seq(m, [1, 2, 3, 4, 5])
    repeat = make_seq([1, 2, 3, 4] * 2 + [0])
    m.allocate(repeat)
    assert len(set(repeat.block_table)) == len(repeat.block_table) == 3
    assert repeat.block_table[0] == first.block_table[0]
    assert repeat.num_cached_tokens == BS
    check_ref_counts(m, [first, repeat])


def test_freed_blocks_keep_their_hash_and_can_be_hit() -> None:
    m = BlockManager(8, BS)
    tokens = list(range(2 * BS)) + [99]
    first = computed_seq(m, tokens)
    cached = first.block_table[:2]
    m.free(first)
    assert m.num_free_blocks == 8
    assert all(m.blocks[b].hash is not None for b in cached)
    again = make_seq(tokens)
    assert m.can_allocate(again)
    m.allocate(again)
    assert again.block_table[:2] == cached and again.num_cached_tokens == 2 * BS
    assert m.num_used_blocks == 3 and all(m.blocks[b].ref_count == 1 for b in cached)
    check_ref_counts(m, [again])


def test_reusing_a_freed_cached_block_evicts_its_hash() -> None:
    m = BlockManager(2, BS)
    tokens = list(range(BS)) + [99]
    first = computed_seq(m, tokens)
    block = first.block_table[0]
    h = m.blocks[block].hash
    assert m.hash_to_block == {h: block}
    m.free(first)
    filler = make_seq([7] * (2 * BS))  # needs both blocks: the cached one is evicted
    m.allocate(filler)
    assert block in filler.block_table
    assert h not in m.hash_to_block and m.blocks[block].hash is None
    m.free(filler)
    again = make_seq(tokens)
    m.allocate(again)
    assert again.num_cached_tokens == 0  # no stale hit on the overwritten block


def test_eviction_prefers_blocks_freed_first_and_tails_first() -> None:
    m = BlockManager(6, BS)
    tokens = list(range(2 * BS)) + [99]
    first = computed_seq(m, tokens)
    table = list(first.block_table)
    m.free(first)
    one = make_seq([7] * 3 * BS)  # takes the never-used blocks, not the cached prefix
    m.allocate(one)
    assert not set(one.block_table) & set(table)
    two = make_seq([8])  # then the tail of the freed sequence, before its prefix
    m.allocate(two)
    assert two.block_table == [table[2]]
    m.free(two)
    again = make_seq(tokens)  # the prefix blocks survived
    m.allocate(again)
    assert again.num_cached_tokens == 2 * BS


def test_pool_too_small() -> None:
    m = BlockManager(2, BS)
    seq = make_seq(list(range(2 * BS + 1)))
    assert not m.can_allocate(seq)
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        m.allocate(seq)
    assert seq.block_table == [] and m.num_free_blocks == 2
    ok = make_seq(list(range(2 * BS)))
    assert m.can_allocate(ok)
    m.allocate(ok)
    ok.num_computed_tokens = ok.num_tokens
    ok.append_token(0, now=0.0)
    assert not m.can_append(ok)
    with pytest.raises(RuntimeError, match="no free block"):
        m.append_slot(ok)


def test_can_allocate_counts_free_cached_blocks_it_revives() -> None:
    m = BlockManager(3, BS)
    tokens = list(range(2 * BS)) + [99]
    first = computed_seq(m, tokens)
    m.free(first)  # 3 free blocks, 2 of them cached
    again = make_seq(tokens)
    assert m.can_allocate(again)  # 2 hits from the free list + 1 fresh = 3
    longer = make_seq(tokens + list(range(BS)))
    assert not m.can_allocate(longer)  # 2 hits + 2 fresh > 3


def test_fork_and_copy_on_write() -> None:
    m = BlockManager(8, BS)
    parent = computed_seq(m, list(range(BS + 2)))  # last block half full
    child = make_seq(parent.token_ids)
    m.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(m.blocks[b].ref_count == 2 for b in parent.block_table)
    last = parent.block_table[-1]

    parent.append_token(50, now=0.0)
    copies = m.append_slot(parent)
    assert copies == [(last, parent.block_table[-1])]
    assert parent.block_table[-1] != last and child.block_table[-1] == last
    assert m.blocks[last].ref_count == 1 and m.blocks[parent.block_table[-1]].ref_count == 1
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared

    child.append_token(60, now=0.0)
    assert m.append_slot(child) == []  # the child now owns the old block alone
    check_ref_counts(m, [parent, child])
    m.free(parent)
    m.free(child)
    assert m.num_free_blocks == 8


def forked_mid_prefill(num_blocks: int) -> tuple[BlockManager, Sequence, Sequence]:
    """A 5-block prompt computed up to the middle of its 3rd block, then forked into a child
    that goes on with other tokens: the child shares 2 full blocks ahead of its write position
    and the 3 blocks its remaining positions (10..19) fall in."""
    m = BlockManager(num_blocks, BS)
    parent = make_seq(list(range(5 * BS)))
    m.allocate(parent)
    m.append_slot(parent, 2 * BS + 2)  # a first prefill chunk: blocks 0, 1 full, block 2 half
    parent.num_computed_tokens = 2 * BS + 2
    m.mark_computed(parent)
    child = make_seq(parent.token_ids[: 2 * BS + 2] + [100 + t for t in range(3 * BS - 2)])
    m.fork(parent, child)
    return m, parent, child


@pytest.mark.parametrize("chunk, copied", [
    (1, [2]), (2, [2]), (3, [2, 3]), (6, [2, 3]), (7, [2, 3, 4]), (3 * BS - 2, [2, 3, 4])])
def test_fork_mid_prefill_copies_every_shared_block_the_chunk_writes(chunk, copied) -> None:
    m, parent, child = forked_mid_prefill(8)
    shared = list(parent.block_table)
    assert all(m.blocks[b].ref_count == 2 for b in shared)
    free = m.num_free_blocks
    copies = m.append_slot(child, chunk)
    assert copies == [(shared[i], child.block_table[i]) for i in copied]
    assert len({dst for _, dst in copies} | set(shared)) == len(shared) + len(copied)
    assert parent.block_table == shared  # the other owner keeps every block
    assert child.block_table == [child.block_table[i] if i in copied else b
                                 for i, b in enumerate(shared)]
    assert m.num_free_blocks == free - len(copied)
    for i, b in enumerate(shared):
        assert m.blocks[b].ref_count == (1 if i in copied else 2)
        assert m.blocks[child.block_table[i]].ref_count == (1 if i in copied else 2)
    check_ref_counts(m, [parent, child])
    child.num_computed_tokens += chunk
    m.mark_computed(child)
    rest = child.num_pending_tokens  # the next chunk copies the shared blocks still left
    if rest:
        left = [i for i in range(5) if i not in copied and (child.num_computed_tokens // BS) <= i]
        assert [src for src, _ in m.append_slot(child, rest)] == [shared[i] for i in left]
    assert not set(child.block_table[2:]) & set(parent.block_table)  # nothing written is shared
    assert m.append_slot(parent, parent.num_pending_tokens) == []  # the parent owns the rest alone
    check_ref_counts(m, [parent, child])
    m.free(parent)
    m.free(child)
    assert m.num_free_blocks == 8


@pytest.mark.parametrize("spare", [1, 2])
def test_fork_mid_prefill_needs_a_free_block_for_every_copy(spare) -> None:
    """The chunk writes 3 shared blocks: 3 free blocks are needed, 1 or 2 are not enough (the
    scheduler relies on can_append to preempt instead of over-committing)."""
    m, parent, child = forked_mid_prefill(5 + spare)  # the prompt holds 5, `spare` are free
    assert m.num_free_blocks == spare
    assert not m.can_append(child, 3 * BS - 2)
    before = ([b.ref_count for b in m.blocks], list(m.free_blocks), list(child.block_table))
    with pytest.raises(RuntimeError, match="no free block"):
        m.append_slot(child, 3 * BS - 2)
    assert ([b.ref_count for b in m.blocks], list(m.free_blocks), child.block_table) == before
    assert m.can_append(child, spare * BS - 2)  # a shorter chunk writes fewer shared blocks


def test_fork_mid_prefill_with_a_free_block_per_copy_fits_exactly() -> None:
    m, parent, child = forked_mid_prefill(5 + 3)
    assert m.can_append(child, 3 * BS - 2)
    assert len(m.append_slot(child, 3 * BS - 2)) == 3 and m.num_free_blocks == 0
    check_ref_counts(m, [parent, child])


def test_fork_into_a_sequence_with_blocks_raises() -> None:
    m = BlockManager(8, BS)
    a = computed_seq(m, [1, 2])
    b = computed_seq(m, [3, 4])
    with pytest.raises(ValueError, match="already holds blocks"):
        m.fork(a, b)


def test_usage_figures() -> None:
    m = BlockManager(10, BS)
    assert m.usage() == {"num_blocks": 10, "blocks_used": 0, "utilization": 0.0,
                         "prefix_hit_rate": 0.0}
    a = computed_seq(m, list(range(2 * BS)) + [1])  # 9 tokens in 3 blocks: 3 slots empty
    b = make_seq(list(range(2 * BS)) + [2, 3])  # 10 tokens, 2 blocks hit: 1 new block
    m.allocate(b)
    u = m.usage([a, b])
    assert u["blocks_used"] == 4 and u["utilization"] == pytest.approx(0.4)
    assert u["tokens_stored"] == 19
    assert u["fragmentation_tokens"] == 6 * BS - 19
    assert u["fragmentation"] == pytest.approx((6 * BS - 19) / (6 * BS))
    # queries: a looked up 2 full blocks (0 hits), b looked up 2 (2 hits)
    assert u["prefix_hit_rate"] == pytest.approx(2 / 4)
    assert m.usage([])["fragmentation"] == 0.0


def test_double_free_of_a_stale_table_raises_and_changes_nothing() -> None:
    m = BlockManager(4, BS)
    seq = computed_seq(m, list(range(BS + 1)))
    table = list(seq.block_table)
    m.free(seq)
    m.free(seq)  # empty table: a no-op
    assert m.num_free_blocks == 4
    seq.block_table = table  # a caller error: freeing the same blocks again
    with pytest.raises(RuntimeError, match="double free"):
        m.free(seq)
    check_ref_counts(m, [])
    assert m.num_free_blocks == 4


def test_double_free_does_not_touch_blocks_owned_by_others() -> None:
    m = BlockManager(2, BS)
    seq = computed_seq(m, list(range(BS + 1)))
    stale = list(seq.block_table)
    m.free(seq)
    keep = make_seq([5])  # takes the stale tail (freed first)
    m.allocate(keep)
    assert keep.block_table == [stale[1]]
    seq.block_table = stale  # a caller error: its tail is keep's now, its head is free
    before = [b.ref_count for b in m.blocks]
    with pytest.raises(RuntimeError, match="double free"):
        m.free(seq)
    assert [b.ref_count for b in m.blocks] == before  # keep's block was not decremented
    check_ref_counts(m, [keep])


def test_append_slot_without_free_block_raises() -> None:
    m = BlockManager(1, BS)
    seq = computed_seq(m, list(range(BS)))
    seq.append_token(0, now=0.0)
    with pytest.raises(RuntimeError):
        m.append_slot(seq)
    assert seq.block_table and m.num_free_blocks == 0


def test_no_prefix_caching() -> None:
    m = BlockManager(8, BS, enable_prefix_caching=False)
    tokens = list(range(2 * BS)) + [1]
    first = computed_seq(m, tokens)
    assert m.hash_to_block == {} and all(b.hash is None for b in m.blocks)
    again = make_seq(tokens)
    m.allocate(again)
    assert again.num_cached_tokens == 0 and not set(again.block_table) & set(first.block_table)
    assert m.usage()["prefix_hit_rate"] == 0.0


@pytest.mark.parametrize("block_size", [0, 3, -16, True, 2.0, 12, None])
def test_bad_block_size(block_size) -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, block_size)


@pytest.mark.parametrize("num_blocks", [0, -1, True, 2.0, None])
def test_bad_num_blocks(num_blocks) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks, BS)


def test_allocate_twice_raises() -> None:
    m = BlockManager(8, BS)
    seq = make_seq([1, 2, 3])
    m.allocate(seq)
    with pytest.raises(ValueError, match="already holds blocks"):
        m.allocate(seq)
    assert m.num_used_blocks == 1
