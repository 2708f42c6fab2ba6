"""Chapter 6's checks (PagedAttention): right answers pass, plausible wrong ones fail, stubs are reported.

The right answers are written here in plain Python and torch (not with the library the checks
compare with), so a pass means the check accepts an independent implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from check_contract import (
    HIDDEN_SEEDS,
    contract_tests,
    hidden_contract_tests,
    visible_and_hidden_inputs,
)

from course_lib import grading
from course_lib.grading import (
    TASKS,
    check_block_allocator,
    check_paged_attention,
    check_slot_mapping,
)
from course_lib.grading.checks_paged import RANDOM_RUNS, RUN_SHAPES

# --- right answers ---------------------------------------------------------------------------


class BlockAllocator:
    """The solution of exercise (a), with switches that turn it into the usual mistakes."""

    # the mistakes (all off in the right answer)
    ref_count_on_allocate = 1
    copy_on_write = True
    respect_ref_counts_on_free = True
    check_before_taking = True
    new_block_when_full = True
    copy_always = False

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}

    def _take(self) -> int:
        if not self.free_blocks:
            raise MemoryError("no free block")
        block = self.free_blocks.pop()
        self.ref_counts[block] = self.ref_count_on_allocate
        return block

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        needed = math.ceil(num_tokens / self.block_size)
        if self.check_before_taking and needed > len(self.free_blocks):
            raise MemoryError(f"{needed} blocks needed, {len(self.free_blocks)} free")
        table = [self._take() for _ in range(needed)]
        self.block_tables[seq_id], self.num_tokens[seq_id] = table, num_tokens
        return table

    def append(self, seq_id: int):
        table, n = self.block_tables[seq_id], self.num_tokens[seq_id]
        copy = None
        full = n % self.block_size == 0 if self.new_block_when_full else (n + 1) % self.block_size == 0
        if full:
            table.append(self._take())
        elif self.copy_always or (self.copy_on_write and self.ref_counts[table[-1]] > 1):
            src = table[-1]
            dst = self._take()
            self.ref_counts[src] -= 1
            if self.ref_counts[src] == 0:
                self.free_blocks.append(src)
            table[-1] = dst
            copy = (src, dst)
        self.num_tokens[seq_id] = n + 1
        return copy

    def fork(self, parent_id: int, child_id: int) -> None:
        for block in self.block_tables[parent_id]:
            self.ref_counts[block] += 1
        self.block_tables[child_id] = list(self.block_tables[parent_id])
        self.num_tokens[child_id] = self.num_tokens[parent_id]

    def free(self, seq_id: int) -> None:
        for block in self.block_tables.pop(seq_id):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0 or not self.respect_ref_counts_on_free:
                self.ref_counts[block] = max(self.ref_counts[block], 0)
                self.free_blocks.append(block)
        del self.num_tokens[seq_id]


class FifoAllocator(BlockAllocator):
    """Also right: hands out the lowest free block first (a different but valid order)."""

    def _take(self) -> int:
        if not self.free_blocks:
            raise MemoryError("no free block")
        block = min(self.free_blocks)
        self.free_blocks.remove(block)
        self.ref_counts[block] = 1
        return block


def slot_mapping(block_table, start, num_tokens, block_size):
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start, start + num_tokens)]


def slot_mapping_tensor(block_table, start, num_tokens, block_size):
    p = torch.arange(start, start + num_tokens)
    return torch.tensor(block_table)[p // block_size] * block_size + p % block_size


def paged_attention(q, k_cache, v_cache, block_table, context_len):
    block_size = k_cache.shape[1]
    blocks = torch.tensor(block_table[: math.ceil(context_len / block_size)])
    k = k_cache[blocks].flatten(0, 1)[:context_len]  # [L, H, D]
    v = v_cache[blocks].flatten(0, 1)[:context_len]
    scores = torch.einsum("hd,lhd->hl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


def paged_attention_loop(q, k_cache, v_cache, block_table, context_len):  # token by token
    block_size = k_cache.shape[1]
    ks, vs = [], []
    for p in range(context_len):
        block = block_table[p // block_size]
        ks.append(k_cache[block, p % block_size])
        vs.append(v_cache[block, p % block_size])
    k, v = torch.stack(ks, 1), torch.stack(vs, 1)  # [H, L, D]
    return torch.nn.functional.scaled_dot_product_attention(q[:, None], k, v)[:, 0]


# --- plausible wrong answers -----------------------------------------------------------------


def _variant(name, **switches):
    return type(name, (BlockAllocator,), switches)


FreesSharedBlocks = _variant("FreesSharedBlocks", respect_ref_counts_on_free=False)
NoCopyOnWrite = _variant("NoCopyOnWrite", copy_on_write=False)
NoRefCountOnAllocate = _variant("NoRefCountOnAllocate", ref_count_on_allocate=0)
LeaksOnMemoryError = _variant("LeaksOnMemoryError", check_before_taking=False)
NewBlockOneTokenEarly = _variant("NewBlockOneTokenEarly", new_block_when_full=False)
CopiesEveryPartlyFilledBlock = _variant("CopiesEveryPartlyFilledBlock", copy_always=True)


class ForkWithoutCounts(BlockAllocator):
    def fork(self, parent_id, child_id):  # shares the blocks but never counts the new owner
        self.block_tables[child_id] = list(self.block_tables[parent_id])
        self.num_tokens[child_id] = self.num_tokens[parent_id]


class SilentDoubleFree(BlockAllocator):
    def free(self, seq_id):
        if seq_id in self.block_tables:
            super().free(seq_id)


class CowWithoutReporting(BlockAllocator):
    def append(self, seq_id):
        super().append(seq_id)
        return None  # the copy happened, but the caller never learns it must copy the K/V


def slot_off_by_one(block_table, start, num_tokens, block_size):
    return slot_mapping(block_table, start + 1, num_tokens, block_size)


def slot_ignores_the_table(block_table, start, num_tokens, block_size):  # a contiguous cache
    return list(range(start, start + num_tokens))


def slot_block_index_times_table(block_table, start, num_tokens, block_size):
    return [block_table[p // block_size] + p % block_size for p in range(start, start + num_tokens)]


def attention_without_scaling(q, k_cache, v_cache, block_table, context_len):
    return paged_attention(q * math.sqrt(q.shape[-1]), k_cache, v_cache, block_table, context_len)


def attention_reads_padding_blocks(q, k_cache, v_cache, block_table, context_len):
    blocks = torch.tensor(block_table)  # the -1 padding included: k_cache[-1] is the last block
    k, v = k_cache[blocks].flatten(0, 1), v_cache[blocks].flatten(0, 1)
    scores = torch.einsum("hd,lhd->hl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


def attention_whole_last_block(q, k_cache, v_cache, block_table, context_len):
    n = math.ceil(context_len / k_cache.shape[1])
    return paged_attention(q, k_cache, v_cache, block_table, n * k_cache.shape[1])


def attention_contiguous(q, k_cache, v_cache, block_table, context_len):
    return paged_attention(q, k_cache, v_cache, list(range(len(block_table))), context_len)


def attention_off_by_one_context(q, k_cache, v_cache, block_table, context_len):
    return paged_attention(q, k_cache, v_cache, block_table, context_len + 1)


def attention_in_table_order_of_ids(q, k_cache, v_cache, block_table, context_len):
    n = math.ceil(context_len / k_cache.shape[1])
    return paged_attention(q, k_cache, v_cache, sorted(block_table[:n]), context_len)


RIGHT = {
    check_block_allocator: [BlockAllocator, FifoAllocator],
    check_slot_mapping: [slot_mapping, slot_mapping_tensor],
    check_paged_attention: [paged_attention, paged_attention_loop],
}

WRONG = [
    (check_block_allocator, FreesSharedBlocks, "on the free list although sequences"),
    (check_block_allocator, NoCopyOnWrite, "owns alone (copy-on-write)"),
    (check_block_allocator, NoRefCountOnAllocate, "ref_counts"),
    (check_block_allocator, LeaksOnMemoryError, "raised MemoryError (right) but changed"),
    (check_block_allocator, NewBlockOneTokenEarly, "blocks"),
    (check_block_allocator, CopiesEveryPartlyFilledBlock, "which it owned alone"),
    (check_block_allocator, ForkWithoutCounts, "references) but ref_counts"),
    (check_block_allocator, SilentDoubleFree, "must raise KeyError"),
    (check_block_allocator, CowWithoutReporting, "must return (src, dst)"),
    (check_slot_mapping, slot_off_by_one, "should be slot"),
    (check_slot_mapping, slot_ignores_the_table, "should be slot"),
    (check_slot_mapping, slot_block_index_times_table, "should be slot"),
    (check_paged_attention, attention_without_scaling, "did you forget to scale"),
    (check_paged_attention, attention_reads_padding_blocks, "the padding (-1) too?"),
    (check_paged_attention, attention_whole_last_block, "the last block is partly filled"),
    (check_paged_attention, attention_in_table_order_of_ids, "in the order of their ids?"),
    (check_paged_attention, attention_contiguous, "as if the cache were contiguous?"),
    (check_paged_attention, attention_off_by_one_context, "values differ"),
]


def not_implemented(*args, **kwargs):
    raise NotImplementedError()


class NotImplementedAllocator(BlockAllocator):
    def allocate(self, seq_id, num_tokens):
        raise NotImplementedError()


NOT_IMPLEMENTED = {check_block_allocator: NotImplementedAllocator,
                   check_slot_mapping: not_implemented, check_paged_attention: not_implemented}


# --- tests -----------------------------------------------------------------------------------


test_right_answer_passes, test_wrong_answer_fails, test_not_implemented_is_reported = \
    contract_tests(RIGHT, WRONG, NOT_IMPLEMENTED)


def test_points_and_registry() -> None:
    assert [c.points for c in RIGHT] == [3, 2, 3]
    tasks = {k: t for k, t in TASKS.items() if t.notebook == "06_paged_attention"}
    assert list(tasks) == ["06.block_allocator", "06.slot_mapping", "06.paged_attention"]
    assert [t.check for t in tasks.values()] == list(RIGHT)
    assert grading.total_points("06_paged_attention") == 8


def test_grade_reports_missing_names(capsys) -> None:
    results = grading.grade({"BlockAllocator": BlockAllocator}, "06_paged_attention")
    assert [r.passed for r in results] == [True, False, False]
    assert "slot_mapping is not defined" in results[1].message


# --- hidden cases (course-lib grade --hidden) -------------------------------------------------


def zeros_like_q(q, k_cache, v_cache, block_table, context_len):
    return torch.zeros_like(q)


test_hidden_right_answer_passes, test_hardcoding_fails_hidden = hidden_contract_tests(RIGHT, [
    (check_slot_mapping, slot_mapping, slot_ignores_the_table),
    (check_paged_attention, paged_attention, zeros_like_q),
])


def _recording_allocator(runs: list):
    """A right allocator that logs, per instance, its constructor arguments and every call."""

    class Recording(BlockAllocator):
        def __init__(self, num_blocks, block_size):
            self.log = [("init", num_blocks, block_size)]
            runs.append(self.log)
            super().__init__(num_blocks, block_size)

        def allocate(self, seq_id, num_tokens):
            self.log.append(("allocate", seq_id, num_tokens))
            return super().allocate(seq_id, num_tokens)

        def append(self, seq_id):
            self.log.append(("append", seq_id))
            return super().append(seq_id)

        def fork(self, parent_id, child_id):
            self.log.append(("fork", parent_id, child_id))
            super().fork(parent_id, child_id)

        def free(self, seq_id):
            self.log.append(("free", seq_id))
            super().free(seq_id)

    return Recording


def test_hidden_allocator_runs_are_new(capsys) -> None:
    """Hidden mode keeps the fixed cases, and runs every random interleaving on operations (and
    pools) that visible mode never shows: an allocator tuned to the visible runs learns nothing."""
    visible: list = []
    assert check_block_allocator(_recording_allocator(visible)).passed
    seen_logs = {tuple(log) for log in visible}
    seen_pools = {log[0] for log in visible}
    for seed in HIDDEN_SEEDS:
        runs: list = []
        result = check_block_allocator(_recording_allocator(runs), hidden_seed=seed)
        assert result.passed
        hidden = runs[len(visible):]  # the visible pass runs first, then the hidden one
        assert [tuple(log) for log in hidden[:-RANDOM_RUNS]] == \
            [tuple(log) for log in visible[:-RANDOM_RUNS]]  # the fixed cases stay
        new = hidden[-RANDOM_RUNS:]
        assert all(tuple(log) not in seen_logs for log in new)
        assert {log[0] for log in new} - seen_pools, "some hidden pool should differ in size"
        assert len({log[0][2] for log in new}) > 1
        seen_logs |= {tuple(log) for log in new}  # the next seed's runs are new again


def test_hidden_failure_is_labelled(capsys) -> None:
    result = check_block_allocator(NoCopyOnWrite, raise_on_fail=False, hidden_seed=1)
    assert not result.passed and not result.message.startswith("hidden case")  # visible first
    result = check_block_allocator(_FailsOnlyInHiddenPools, raise_on_fail=False, hidden_seed=1)
    assert not result.passed and result.message.startswith("hidden case, random run (hidden run")


class _FailsOnlyInHiddenPools(BlockAllocator):
    """Right on the pool sizes the visible cases use; forgets ref counts on fork elsewhere."""

    def fork(self, parent_id, child_id):
        pools = {(4, 4), (3, 2), (2, 2), *RUN_SHAPES}
        if (len(self.ref_counts), self.block_size) in pools:
            return super().fork(parent_id, child_id)
        return ForkWithoutCounts.fork(self, parent_id, child_id)


@pytest.mark.parametrize("check, learner", [(check_slot_mapping, slot_mapping),
                                            (check_paged_attention, paged_attention)],
                         ids=lambda x: x.__name__)
def test_hidden_cases_depend_on_the_seed(check, learner, capsys) -> None:
    """Each instructor's seed gives its own cases (beyond the hand-picked ones both keep)."""
    (visible, a), (_, b) = (map(set, visible_and_hidden_inputs(check, [learner], seed))
                            for seed in HIDDEN_SEEDS)
    assert a - visible and b - visible and a - visible - b and b - visible - a
