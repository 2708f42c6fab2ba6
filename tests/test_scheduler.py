"""The scheduler without a model: budgets, decodes before prefills, chunking, preemption."""

import pytest

from course_lib.serving.block_manager import BlockManager
from course_lib.serving.scheduler import Scheduler
from course_lib.serving.sequence import SamplingParams, Sequence, SequenceStatus


def seq(n_prompt: int, max_tokens: int = 8, t: float = 0.0) -> Sequence:
    return Sequence(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), arrival_time=t)


def run_step(sched: Scheduler, produce: bool = True):
    """Schedule, then pretend the model ran: advance computed tokens, add a token when caught up."""
    out = sched.schedule(now=0.0)
    for s, n in out.scheduled:
        s.num_computed_tokens += n
        if produce and s.num_computed_tokens == s.num_tokens:
            s.append_token(7, now=0.0)
    return out


def test_decodes_first_then_prefills_within_budgets():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=10)
    a, b = seq(6, t=0), seq(6, t=1)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    # 10 tokens: a's whole prompt (6), then b chunked to the 4 left
    assert [(s.request_id, n) for s, n in out.scheduled] == [(a.request_id, 6), (b.request_id, 4)]
    c = seq(20, t=2)
    sched.add(c)
    out = run_step(sched)
    # a decodes (1) first, then b's last 2 prompt tokens, then c chunked to the remaining 7
    assert [(s.request_id, n) for s, n in out.scheduled] == [
        (a.request_id, 1), (b.request_id, 2), (c.request_id, 7)]
    assert out.num_batched_tokens == 10
    d = seq(3, t=3)
    sched.add(d)
    out = run_step(sched)
    assert d not in [s for s, _ in out.scheduled]  # max_num_seqs = 3 running already
    assert list(sched.waiting) == [d]


def test_preempts_newest_by_recompute_when_blocks_run_out():
    bm = BlockManager(6, 4)  # 24 slots
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    old, mid, new = seq(4, 8, t=0), seq(4, 8, t=1), seq(4, 8, t=2)
    for s in (old, mid, new):
        sched.add(s)
    run_step(sched)  # all prompts in: 3 blocks, one token generated each
    run_step(sched)  # all decode into a second block each: 6 blocks, pool full
    assert bm.num_free_blocks == 0
    for _ in range(3):
        run_step(sched)
    out = run_step(sched)  # old needs a third block: the newest running sequence goes, not mid
    assert out.preempted == [new] and mid.status is SequenceStatus.RUNNING
    assert new.status is SequenceStatus.WAITING and new.block_table == []
    assert new.num_computed_tokens == 0 and new.num_output_tokens > 0  # tokens kept, KV dropped
    assert sched.waiting[0] is new and sched.num_preemptions == 1


def test_a_request_that_can_never_fit_is_refused():
    sched = Scheduler(BlockManager(4, 16), max_num_seqs=2, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="cache holds 64"):
        sched.add(seq(60, max_tokens=8))


def test_a_request_needing_the_whole_pool_completes_beside_others():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    whole = seq(4, max_tokens=12, t=0)  # exactly 16 slots: the whole pool
    others = [seq(3, 5, t=1 + i) for i in range(3)]
    for s in (whole, *others):
        sched.add(s)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        run_step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= s.params.max_tokens:
                s.finish("length")
                sched.finish(s)
    assert not sched.has_unfinished(), "scheduler stalled"
    assert all(s.num_output_tokens == s.params.max_tokens for s in (whole, *others))
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=8), "at least one block"),
    (dict(max_num_seqs=32, max_num_batched_tokens=16), "max_num_seqs"),
    (dict(max_num_batched_tokens=2.5), "max_num_batched_tokens"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Scheduler(BlockManager(8, 16), **kwargs)


@pytest.mark.parametrize("num_blocks", [8, 6])
def test_a_fork_mid_prefill_gets_a_copy_of_every_shared_block_or_preempts(num_blocks):
    """A sequence forked in the middle of a chunked prefill, whose next chunk writes 3 shared
    blocks: with 3 free blocks it gets 3 copies; with 1 the scheduler must not schedule it on
    one copy, it preempts the other owner (then nothing is shared and no copy is needed)."""
    bm = BlockManager(num_blocks, 4)  # the prompt takes 5 blocks
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    parent = seq(20, max_tokens=4, t=1)
    sched.add(parent)
    run_step(sched)  # positions 0..9: blocks 0, 1 full, block 2 half
    child = Sequence(parent.token_ids[:10] + [100] * 10, SamplingParams(max_tokens=4),
                     arrival_time=0.0)  # other tokens; older, so it runs first
    bm.fork(parent, child)
    child.status = SequenceStatus.RUNNING
    sched.running.append(child)
    shared = list(parent.block_table)
    out = run_step(sched)  # the child's 10 tokens: positions 10..19, blocks 2, 3, 4
    assert [(s, n) for s, n in out.scheduled] == [(child, 10)]
    if num_blocks == 8:
        assert out.copies == [(shared[i], child.block_table[i]) for i in (2, 3, 4)]
        assert parent.block_table == shared and out.preempted == []
    else:
        assert out.preempted == [parent] and parent.block_table == []
        assert out.copies == [] and child.block_table == shared
    assert bm.num_free_blocks == num_blocks - len(set(parent.block_table) | set(child.block_table))
