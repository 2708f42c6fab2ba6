"""The continuous-batching engine on the bundled tiny model: same greedy tokens as one sequence
alone, under chunking, preemption and prefix caching; aborts free blocks; bad input is refused."""

import pytest
import torch

from course_lib.models.gpt import GPT
from course_lib.models.hub import load_model
from course_lib.models.paged import PagedAttentionMetadata, PagedKVCache
from course_lib.serving.engine import LLMEngine, SamplingParams, Sequence, SequenceStatus

PROMPT_LENS = [5, 40, 17, 1, 33, 70]
MAX_TOKENS = [10, 3, 25, 8, 30, 12]


@pytest.fixture(scope="module")
def tiny():
    hf, tok = load_model("tiny", device="cpu")
    return GPT.from_hf(hf), tok


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def alone(model, prompt, n):
    """Greedy tokens of one sequence through the contiguous cache of chapter 4."""
    cache = model.new_cache(1, len(prompt) + n)
    logits, out = model(torch.tensor([prompt]), cache), []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache)
    return out


@pytest.fixture(scope="module")
def expected(tiny, prompts):
    return [alone(tiny[0], p, n) for p, n in zip(prompts, MAX_TOKENS, strict=True)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("settings", [
    dict(),  # everything fits: one prefill step, then mixed decodes
    dict(num_blocks=12, block_size=8, max_num_seqs=4, max_num_batched_tokens=32),  # chunks, preempts
    dict(num_blocks=90, block_size=1, max_num_seqs=2, max_num_batched_tokens=8),  # block size 1
])
def test_mixed_batch_matches_single_sequence_greedy(tiny, prompts, expected, settings):
    engine = LLMEngine(*tiny, **settings)
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS], progress=False)
    assert [o.output_token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" and o.finished for o in outs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_and_chunking_happened_in_the_small_pool(tiny, prompts):
    engine = LLMEngine(*tiny, num_blocks=12, block_size=8, max_num_seqs=4, max_num_batched_tokens=32)
    engine.generate(prompts, [greedy(n) for n in MAX_TOKENS], progress=False)
    assert engine.scheduler.num_preemptions > 0  # the small pool really forced recompute
    chunks = [n for s in engine.steps for _, n in s.scheduled]
    assert 1 < min(n for n in chunks if n > 1) and max(chunks) <= 32
    assert max(sum(n for _, n in s.scheduled) for s in engine.steps) <= 32
    assert max(len(s.scheduled) for s in engine.steps) <= 4


def test_paged_forward_equals_contiguous(tiny, prompts):
    model = tiny[0]
    cache = PagedKVCache.for_model(model, num_blocks=32, block_size=4)
    tables = [[3, 9, 1], [0, 7, 30, 2, 5, 11, 12, 13, 14, 15, 16]]  # shuffled physical blocks
    seqs = [prompts[0][:5], prompts[1][:40]]
    meta = PagedAttentionMetadata.build(cache, tables, [0, 0], [len(s) for s in seqs], "torch")
    with torch.no_grad():
        logits = model(torch.tensor([seqs[0] + seqs[1]]), meta)[0]
        for row, s in enumerate(seqs):
            torch.testing.assert_close(logits[row], model(torch.tensor([s]))[0, -1],
                                       rtol=1e-4, atol=1e-4)


def test_prefix_caching_hits_and_keeps_outputs(tiny, prompts):
    system = prompts[5][:64]  # 4 full blocks of 16 shared by every request
    asks = [system + p[:7] for p in prompts[:4]]
    want = [alone(tiny[0], a, 6) for a in asks]
    engine = LLMEngine(*tiny, max_num_seqs=1, max_num_batched_tokens=128)  # one at a time
    outs = engine.generate(asks, greedy(6), progress=False)
    assert [o.output_token_ids for o in outs] == want
    assert [o.num_cached_tokens for o in outs] == [0, 64, 64, 64]
    assert engine.stats()["prefix_hit_rate"] == pytest.approx(12 / 16)


def test_fork_mid_prefill_writing_other_tokens_keeps_both_outputs(tiny, prompts):
    """A sequence forked in the middle of a chunked prefill shares all the prompt's blocks; its
    next chunk writes *other* tokens into several of them. Each must be copied first, or the
    two sequences overwrite each other's keys and values (greedy outputs then differ)."""
    model, tok = tiny
    engine = LLMEngine(model, tok, num_blocks=32, block_size=4, max_num_seqs=2,
                       max_num_batched_tokens=10)
    parent_prompt = prompts[1]  # 40 tokens: 10 blocks of 4
    parent = engine.add_request(parent_prompt, greedy(6))
    engine.step()  # a first 10-token chunk: blocks 0, 1 full, block 2 half
    assert parent.num_computed_tokens == 10 and len(parent.block_table) == 10
    # the fork goes on with other tokens than the parent (and runs first: it arrived earlier)
    child_prompt = parent_prompt[:10] + prompts[5][:30]
    child = Sequence(child_prompt, greedy(6), "child", arrival_time=parent.arrival_time - 1)
    child.generator, child.first_scheduled_time = engine.generator, parent.first_scheduled_time
    engine.block_manager.fork(parent, child)
    child.status = SequenceStatus.RUNNING
    engine.scheduler.running.append(child)
    engine.requests[child.request_id] = child
    shared = list(parent.block_table)
    copies = []
    copy_block = engine.cache.copy_block
    engine.cache.copy_block = lambda src, dst: (copies.append((src, dst)), copy_block(src, dst))
    outs = engine.step()
    assert engine.steps[-1].scheduled == [("child", 10)]  # positions 10..19: blocks 2, 3, 4
    assert copies == [(shared[i], child.block_table[i]) for i in (2, 3, 4)]
    assert parent.block_table == shared and child.block_table[:2] == shared[:2]
    while engine.has_unfinished_requests():
        outs += engine.step()
    got = {o.request_id: o.output_token_ids for o in outs if o.finished}
    assert got == {parent.request_id: alone(model, parent_prompt, 6),
                   "child": alone(model, child_prompt, 6)}
    assert {src for src, _ in copies} == set(shared[2:])  # every shared block written was copied
    assert engine.block_manager.num_free_blocks == 32


def test_abort_frees_blocks_and_unknown_or_finished_is_a_no_op(tiny, prompts):
    engine = LLMEngine(*tiny, num_blocks=64)
    a = engine.add_request(prompts[1], greedy(50))
    b = engine.add_request(prompts[0], greedy(2))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort(a.request_id) is True
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    reasons = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert reasons == {a.request_id: "abort", b.request_id: "length"}
    assert engine.block_manager.num_free_blocks == 64
    assert engine.abort(a.request_id) is False  # finished
    assert engine.abort("no-such-request") is False


def test_stop_tokens_seeds_and_metrics(tiny, prompts, expected):
    engine = LLMEngine(*tiny)
    stop_at = expected[0][3]
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=0,
                                                       stop_token_ids=[stop_at]), progress=False)[0]
    assert out.finish_reason == "stop" and out.output_token_ids[-1] == stop_at
    assert stop_at not in out.output_token_ids[:-1]
    m = out.metrics
    assert 0 <= m["queue_time"] <= m["ttft"] <= m["e2e"]
    assert len(m["itl"]) == len(out.output_token_ids) - 1 and min(m["itl"]) >= 0
    sampled = [engine.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=1.0, seed=7),
                               progress=False) for _ in range(2)]
    assert [o.output_token_ids for o in sampled[0]] == [o.output_token_ids for o in sampled[1]]


@pytest.mark.parametrize("kwargs, params, match", [
    (dict(), dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(), dict(max_tokens=2000), "this model's context is 512 tokens"),
    (dict(num_blocks=4), dict(max_tokens=100), r"whole cache holds \(64\)"),
    (dict(block_size=12), dict(), "block_size must be a positive power of two"),
    (dict(max_num_batched_tokens=8), dict(), "at least one block"),
])
def test_bad_input(tiny, prompts, kwargs, params, match):
    with pytest.raises(ValueError, match=match):
        engine = LLMEngine(*tiny, **kwargs)
        engine.add_request(prompts[0], SamplingParams(**params))


def test_prompt_longer_than_context_is_refused_without_leaking(tiny):
    engine = LLMEngine(*tiny, num_blocks=128)
    too_long = [1] * (tiny[0].config.n_positions + 1)
    with pytest.raises(ValueError, match="context"):
        engine.add_request(too_long, greedy(1))
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == 128


def test_generate_with_one_bad_prompt_queues_nothing(tiny, prompts):
    engine = LLMEngine(*tiny, num_blocks=64)
    with pytest.raises(ValueError, match="context"):
        engine.generate([prompts[0], [1] * 2000], greedy(4), progress=False)
    assert not engine.has_unfinished_requests() and engine.requests == {}


def test_triton_kernels_in_the_engine_match(tiny, prompts, expected):
    """The Triton store and decode kernels (interpreted on the CPU) inside the model's forward."""
    engine = LLMEngine(*tiny, num_blocks=16, block_size=8, backend="triton")
    outs = engine.generate([prompts[0], prompts[2]], [greedy(4), greedy(4)], progress=False)
    assert [o.output_token_ids for o in outs] == [expected[0][:4], expected[2][:4]]


def test_generate_names_requests_and_refuses_duplicates(tiny, prompts):
    engine = LLMEngine(*tiny, num_blocks=64)
    outs = engine.generate(prompts[:2], greedy(2), progress=False, request_ids=["a", "b"])
    assert [o.request_id for o in outs] == ["a", "b"]
    with pytest.raises(ValueError, match="already in use"):
        engine.generate(prompts[:2], greedy(2), progress=False, request_ids=["c", "c"])
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("ids, match", [([], "at least one token"), ([5, 8192], r"8192 is outside .*\[0, 8192\)"),
                                        ([-1], "-1 is outside")])
def test_check_request_refuses_empty_prompts_and_unknown_token_ids(tiny, ids, match):
    engine = LLMEngine(*tiny, num_blocks=16)
    with pytest.raises(ValueError, match=match):
        engine.add_request(ids, greedy(1))
    assert engine.requests == {} and not engine.has_unfinished_requests()
