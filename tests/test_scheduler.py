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


def finish_done(sched: Scheduler) -> list[Sequence]:
    """Finish (as the engine does) every running sequence that has all its max_tokens."""
    done = [s for s in sched.running if s.num_output_tokens >= s.params.max_tokens]
    for s in done:
        s.finish("length")
        sched.finish(s)
    return done


def test_no_new_prefill_is_admitted_in_a_step_that_preempted():
    """The step that preempts admits nobody from the waiting queue, even with budget, a free seq
    slot and free blocks: b, preempted, would fit again at once (its 2 prompt blocks are cached
    in a's), and w behind it too. Admitting them would undo the preemption's relief: the
    memory pressure that forced it is still there."""
    bm = BlockManager(5, 4)  # 20 slots
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = seq(8, 8, t=0), seq(8, 8, t=1)  # the same 8-token prompt
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prompts in (2 private blocks each), one token each: 9 tokens
    bm.mark_computed(a)  # a's 2 full blocks are published in the prefix cache (as the engine does)
    bm.mark_computed(b)  # same hashes: a's blocks stay the cached ones
    w = seq(3, 8, t=2)
    sched.add(w)
    assert bm.num_free_blocks == 1
    out = run_step(sched)  # a takes the last block; b cannot grow, is the newest: preempts itself
    assert out.preempted == [b]
    assert bm.num_free_blocks == 2 and bm.can_allocate(b) and bm.can_allocate(w)
    assert len(sched.running) < sched.max_num_seqs and out.num_batched_tokens < 32
    assert [(s, n) for s, n in out.scheduled] == [(a, 1)]  # neither b nor w comes in
    assert list(sched.waiting) == [b, w]
    out = run_step(sched)  # the next step admits them: b first (2 blocks hit), then w
    assert out.preempted == []
    assert [(s, n) for s, n in out.scheduled] == [(a, 1), (b, 1), (w, 3)]
    assert b.num_cached_tokens == 8 and not sched.waiting


def test_a_preempted_sequence_goes_back_to_the_front_of_the_waiting_queue():
    """x waits when new is preempted: new goes in front of x and is admitted before it,
    although x, a 1-block prompt, fits in the block left free right away and new does not."""
    bm = BlockManager(7, 4)  # 28 slots
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=16)
    old, mid, new = seq(4, 8, t=0), seq(4, 8, t=1), seq(8, 8, t=2)
    for s in (old, mid, new):
        sched.add(s)
    x = seq(4, 2, t=3)
    sched.add(x)
    for _ in range(5):  # the budget goes to the prompts, then the first decodes fill the pool
        out = run_step(sched)
        assert x not in [s for s, _ in out.scheduled] and not out.preempted
    out = run_step(sched)  # old and mid need a third block: new, the newest, is preempted
    assert out.preempted == [new]
    assert sched.waiting[0] is new and list(sched.waiting) == [new, x]
    assert len(sched.running) < sched.max_num_seqs
    assert bm.can_allocate(x) and not bm.can_allocate(new)
    admitted = []
    for _ in range(100):
        if not sched.waiting:
            break
        before = list(sched.waiting)
        out = run_step(sched)
        admitted += [s for s, _ in out.scheduled if s in before]
        finish_done(sched)
    assert admitted == [new, x]


def test_max_num_seqs_caps_the_running_set_with_token_budget_and_blocks_to_spare():
    bm = BlockManager(64, 4)  # 256 slots
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=256)
    seqs = [seq(3, 4 + i, t=i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [(s, n) for s, n in out.scheduled] == [(seqs[0], 3), (seqs[1], 3)]
    assert out.num_batched_tokens == 6 and bm.can_allocate(seqs[2])  # room for more, but the cap
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]
    for _ in range(3):  # seqs[0] decodes to its 4 tokens; nobody else comes in meanwhile
        out = run_step(sched)
        assert [s for s, _ in out.scheduled] == seqs[:2]
    assert finish_done(sched) == [seqs[0]]
    out = run_step(sched)  # one slot free: exactly one more, the oldest waiting
    assert [(s, n) for s, n in out.scheduled] == [(seqs[1], 1), (seqs[2], 3)]
    assert list(sched.waiting) == [seqs[3]]


def test_add_refuses_prompt_plus_max_tokens_over_the_pool_like_the_engine():
    """``add`` reserves prompt + max_tokens slots, one more than a request can use (its last
    token is sampled, never fed back), on purpose: it is the bound of ``LLMEngine.check_request``
    and ``max_model_len`` (vLLM's prompt + max_tokens <= max_model_len), which refuse such a
    request before the scheduler sees it. P + T = capacity runs alone, writing capacity - 1 slots;
    P + T = capacity + 1 would fit too, but is refused like the engine refuses it."""
    bm = BlockManager(4, 4)  # 16 slots
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match=r"needs up to 17 KV slots .* cache holds 16"):
        sched.add(seq(4, max_tokens=13))
    assert not sched.has_unfinished()
    s = seq(4, max_tokens=12)
    sched.add(s)
    for _ in range(20):
        if not sched.has_unfinished():
            break
        run_step(sched)
        assert s.num_preemptions == 0
        finish_done(sched)
    assert s.is_finished and s.num_output_tokens == 12
    assert s.num_computed_tokens == 15  # the 16th token's K/V is never written
    assert bm.num_free_blocks == 4


def test_update_from_output_owns_the_post_step_update():
    """The scheduler applies a step's tokens: computed counts for every row, a token only for
    rows that got one, and the finish rule (stop token, EOS unless ignore_eos, max_tokens) with
    the finished sequence's blocks freed at once."""
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    stop = Sequence([1, 2, 3], SamplingParams(max_tokens=5, stop_token_ids=[9]), arrival_time=0)
    eos_kept = Sequence([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), arrival_time=1)
    short = Sequence([1, 2], SamplingParams(max_tokens=1), arrival_time=2)
    chunked = Sequence(list(range(1, 11)), SamplingParams(max_tokens=5), arrival_time=3)
    for s in (stop, eos_kept, short, chunked):
        sched.add(s)
    out = sched.schedule(now=0.0)
    assert [n for _, n in out.scheduled] == [3, 3, 2]  # chunked waits: the budget is spent
    updated = sched.update_from_output(out, [5, 0, 4], now=1.0, eos_token_id=0)
    assert updated == [stop, eos_kept, short]
    assert short.finish_reason == "length" and short.block_table == [] and short not in sched.running
    assert sched.num_prompt_tokens == 8 and sched.num_generation_tokens == 3
    out = sched.schedule(now=1.0)
    assert [(s, n) for s, n in out.scheduled] == [(stop, 1), (eos_kept, 1), (chunked, 6)]
    updated = sched.update_from_output(out, [9, 0, None], now=2.0, eos_token_id=0)
    assert updated == [stop, eos_kept]  # the chunk got no token
    assert stop.finish_reason == "stop" and stop.block_table == []
    assert not eos_kept.is_finished  # EOS, but ignore_eos
    assert chunked.num_computed_tokens == 6 and chunked.num_output_tokens == 0
    assert sched.num_prompt_tokens == 8  # a sequence's prompt counts once, with its first token
    with pytest.raises(ValueError):  # one token (or None) per scheduled row, no fewer
        sched.update_from_output(sched.schedule(now=2.0), [1])


def test_an_admission_walks_the_prefix_hash_chain_once(monkeypatch):
    """The scheduler looks a waiting prompt's cached prefix up once and hands the hits to
    can_allocate and allocate (it used to be walked by each), and the post-step update does not
    re-hash blocks it already published."""
    import course_lib.serving.block_manager as block_manager

    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    first = Sequence(list(range(1, 18)), SamplingParams(max_tokens=4), arrival_time=0)
    sched.add(first)
    out = sched.schedule(now=0.0)
    sched.update_from_output(out, [1], now=0.0)  # 17 tokens: 4 full blocks published
    calls = []
    real = block_manager.chain_hash
    monkeypatch.setattr(block_manager, "chain_hash", lambda *a: calls.append(a) or real(*a))
    again = Sequence(list(range(1, 18)), SamplingParams(max_tokens=4), arrival_time=1)
    sched.add(again)
    out = sched.schedule(now=1.0)
    assert again.num_cached_tokens == 16  # the 4 full blocks were hits
    assert len(calls) == 4  # one hash per full block of the prompt, once
    calls.clear()
    sched.update_from_output(out, [2, 3], now=1.0)
    assert calls == []  # both sequences' full blocks already carry their hashes
