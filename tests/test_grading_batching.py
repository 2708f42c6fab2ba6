"""Chapter 5's checks (continuous batching): right answers pass, plausible wrong ones fail,
stubs are reported; the references agree with the library's scheduler and engine."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from check_contract import (
    HIDDEN_SEEDS,
    contract_tests,
    hidden_contract_tests,
    inputs_seen,
)

from course_lib import grading
from course_lib.grading import TASKS, check_request_metrics, check_schedule_step
from course_lib.grading import checks_batching as cb
from course_lib.models.gpt import GPT, GPTConfig
from course_lib.serving.block_manager import BlockManager
from course_lib.serving.engine import LLMEngine
from course_lib.serving.scheduler import Scheduler
from course_lib.serving.sequence import SamplingParams, Sequence, SequenceStatus

# --- right answers ---------------------------------------------------------------------------


def schedule_step(running, waiting, max_num_seqs, max_num_batched_tokens, num_free_blocks,
                  block_size):
    """Written independently of the reference: one pass with a sort key, then admission."""
    budget, plan = max_num_batched_tokens, []
    order = sorted(range(len(running)), key=lambda i: (running[i][1] != 1, i))
    for i in order:
        request_id, pending = running[i]
        take = min(pending, budget)
        if take == 0:
            break
        plan.append((request_id, take))
        budget -= take
    seats = max_num_seqs - len(running)
    for request_id, prompt in waiting:
        need = (prompt + block_size - 1) // block_size
        if seats <= 0 or budget <= 0 or need > num_free_blocks:
            break
        take = min(prompt, budget)
        plan.append((request_id, take))
        budget, seats, num_free_blocks = budget - take, seats - 1, num_free_blocks - need
    return plan


def schedule_step_lists(*args, **kwargs):  # lists instead of tuples are accepted
    return [list(item) for item in schedule_step(*args, **kwargs)]


def request_metrics(steps, arrival_times, prompt_lens):
    done = dict.fromkeys(prompt_lens, 0)
    token_times = {}
    for step in steps:
        for request_id, n in step.scheduled:
            done[request_id] += n
            if done[request_id] >= prompt_lens[request_id]:
                token_times.setdefault(request_id, []).append(step.end)
    return {r: {"ttft": t[0] - arrival_times[r],
                "itl": [t[i + 1] - t[i] for i in range(len(t) - 1)],
                "e2e": t[-1] - arrival_times[r]} for r, t in token_times.items()}


# --- plausible wrong answers -----------------------------------------------------------------


def variant(decodes_first=True, chunk=True, cap=True, blocks=True, fcfs=True):
    """The reference with one rule broken (each flag off breaks one)."""

    def schedule(running, waiting, max_num_seqs, max_num_batched_tokens, num_free_blocks,
                 block_size):
        budget, plan = max_num_batched_tokens, []
        order = sorted(running, key=lambda r: r[1] != 1) if decodes_first else running
        for request_id, pending in order:
            if budget == 0:
                break
            plan.append((request_id, min(pending, budget)))
            budget -= plan[-1][1]
        seats = max_num_seqs - len(running) if cap else 10**9
        free = num_free_blocks if blocks else 10**9
        for request_id, prompt in waiting:
            need = -(-prompt // block_size)
            if seats <= 0 or budget <= 0 or (not chunk and prompt > budget):
                break
            if need > free:
                if fcfs:
                    break
                continue  # a later, smaller prompt overtakes it
            plan.append((request_id, min(prompt, budget)))
            budget, seats, free = budget - plan[-1][1], seats - 1, free - need
        return plan

    return schedule


prefills_before_decodes = variant(decodes_first=False)  # running in the order given
without_chunking = variant(chunk=False)  # a prompt runs only when all of it fits the budget left
ignoring_max_num_seqs = variant(cap=False)
ignoring_blocks = variant(blocks=False)
overtaking = variant(fcfs=False)
for _name in ("prefills_before_decodes", "without_chunking", "ignoring_max_num_seqs",
              "ignoring_blocks", "overtaking"):
    globals()[_name].__name__ = _name


def ttft_from_first_schedule(steps, arrival_times, prompt_lens):
    out = request_metrics(steps, arrival_times, prompt_lens)
    first = {}
    for step in steps:
        for request_id, _ in step.scheduled:
            first.setdefault(request_id, step.start)
    for request_id, m in out.items():
        m["ttft"] -= first[request_id] - arrival_times[request_id]  # queue time left out
    return out


def token_at_every_chunk(steps, arrival_times, prompt_lens):
    times = {}
    for step in steps:
        for request_id, _ in step.scheduled:
            times.setdefault(request_id, []).append(step.end)
    return {r: {"ttft": t[0] - arrival_times[r], "itl": [b - a for a, b in itertools.pairwise(t)],
                "e2e": t[-1] - arrival_times[r]} for r, t in times.items()}


def step_start_times(steps, arrival_times, prompt_lens):
    shifted = [type(s)(s.start, s.start, s.scheduled) for s in steps]
    return request_metrics(shifted, arrival_times, prompt_lens)


RIGHT = {
    check_schedule_step: [schedule_step, schedule_step_lists, cb.reference_schedule_step],
    check_request_metrics: [request_metrics, cb.reference_request_metrics],
}

WRONG = [
    (check_schedule_step, prefills_before_decodes, "decodes first"),
    (check_schedule_step, without_chunking, "chunked prefill"),
    (check_schedule_step, ignoring_max_num_seqs, "exceeds max_num_seqs"),
    (check_schedule_step, ignoring_blocks, "are free (a whole prompt"),
    (check_schedule_step, overtaking, "do not overtake"),
    (check_request_metrics, ttft_from_first_schedule, "ARRIVAL"),
    (check_request_metrics, token_at_every_chunk, "prefill chunk"),
    (check_request_metrics, step_start_times, "END of the step"),
]


def not_implemented(*args, **kwargs):
    raise NotImplementedError()


# --- tests -----------------------------------------------------------------------------------


test_right_answer_passes, test_wrong_answer_fails, test_not_implemented_is_reported = \
    contract_tests(RIGHT, WRONG, not_implemented)


def test_learner_code_that_crashes_is_reported(capsys) -> None:
    def crashes(*args, **kwargs):
        return [("a", 1)][5]

    result = check_schedule_step(crashes, raise_on_fail=False)
    assert not result.passed and "IndexError" in result.message


def test_points_and_registry() -> None:
    assert [c.points for c in RIGHT] == [3, 2]
    tasks = {k: t for k, t in TASKS.items() if t.notebook == "05_continuous_batching"}
    assert list(tasks) == ["05.schedule_step", "05.request_metrics"]
    assert [t.check for t in tasks.values()] == list(RIGHT)
    assert grading.total_points("05_continuous_batching") == 5


def test_grade_reports_missing_names(capsys) -> None:
    results = grading.grade({"schedule_step": schedule_step}, "05_continuous_batching")
    assert [r.passed for r in results] == [True, False]
    assert "request_metrics is not defined" in results[1].message


# --- the references follow the library -------------------------------------------------------


def _library_schedule(state: dict, rng: random.Random) -> list[tuple[str, int]]:
    """The same state built in a real BlockManager + Scheduler, scheduled once."""
    bs = state["block_size"]
    seqs = []
    for t, (request_id, pending) in enumerate(state["running"]):
        if pending == 1:  # a decode: prompt + some generated tokens, all but the last cached
            seq = Sequence([1] * rng.randint(1, 40), request_id=request_id, arrival_time=t)
            for _ in range(rng.randint(1, 5)):
                seq.append_token(2)
        else:  # a prompt being prefilled in chunks: `pending` of its tokens still to compute
            seq = Sequence([1] * (pending + rng.randint(0, 40)), request_id=request_id,
                           arrival_time=t)
        seqs.append((seq, pending))
    used = sum(-(-s.num_tokens // bs) for s, _ in seqs)
    # one more block, held by a sequence that is not scheduled: a pool is never empty
    manager = BlockManager(used + state["num_free_blocks"] + 1, bs, enable_prefix_caching=False)
    manager.allocate(Sequence([1], request_id="elsewhere"))
    scheduler = Scheduler(manager, state["max_num_seqs"], state["max_num_batched_tokens"])
    for seq, pending in seqs:
        manager.allocate(seq)
        seq.num_computed_tokens = seq.num_tokens - pending
        seq.status = SequenceStatus.RUNNING
        scheduler.running.append(seq)
    for t, (request_id, prompt) in enumerate(state["waiting"]):
        # appended directly: `add` would refuse a prompt larger than this small pool
        scheduler.waiting.append(Sequence([1] * prompt, request_id=request_id,
                                          arrival_time=1000 + t))
    out = scheduler.schedule(now=0.0)
    assert not out.preempted
    return [(seq.request_id, n) for seq, n in out.scheduled]


def test_reference_schedule_matches_the_library_scheduler() -> None:
    rng = random.Random(0)
    states = [kwargs for _, kwargs in cb.SCHEDULE_CASES
              if kwargs["max_num_batched_tokens"] >= max(kwargs["max_num_seqs"], kwargs["block_size"])]
    states += [cb.random_schedule_state(rng) for _ in range(400)]
    for state in states:
        assert cb.reference_schedule_step(**state) == _library_schedule(state, rng), state


def test_every_fixed_case_is_a_valid_state() -> None:
    for label, kwargs in cb.SCHEDULE_CASES:
        assert len(kwargs["running"]) <= kwargs["max_num_seqs"], label


def test_reference_metrics_match_the_engine() -> None:
    """On a real engine run, the step-record times bracket the engine's own token times: the
    engine stamps a token after the forward pass, the step record ends a little later."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=2)).eval()
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3,
                       max_num_batched_tokens=12, enable_prefix_caching=False)
    rng = random.Random(1)
    arrivals, prompt_lens, outputs = {}, {}, {}
    pending = [([rng.randrange(64) for _ in range(rng.randint(1, 30))], rng.randint(1, 8))
               for _ in range(8)]
    while pending or engine.has_unfinished_requests():
        if pending and len(engine.steps) % 2 == 0:  # requests keep arriving
            prompt, n = pending.pop(0)
            seq = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0,
                                                            ignore_eos=True))
            arrivals[seq.request_id], prompt_lens[seq.request_id] = seq.arrival_time, len(prompt)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    assert any(n < p for s in engine.steps for r, n in s.scheduled if (p := prompt_lens[r]) > n)
    ours = cb.reference_request_metrics(list(engine.steps), arrivals, prompt_lens)
    longest = max(s.end - s.start for s in engine.steps)
    assert set(ours) == set(outputs)
    for request_id, out in outputs.items():
        theirs = out.metrics
        assert len(ours[request_id]["itl"]) == len(theirs["itl"]) == len(out.output_token_ids) - 1
        for key in ("ttft", "e2e"):
            assert 0 <= ours[request_id][key] - theirs[key] <= longest
        for a, b in zip(ours[request_id]["itl"], theirs["itl"], strict=True):
            assert abs(a - b) <= longest


# --- hidden cases (course-lib grade --hidden) -------------------------------------------------


test_hidden_right_answer_passes, test_hardcoding_fails_hidden = hidden_contract_tests(RIGHT, [
    (check_schedule_step, schedule_step, prefills_before_decodes),
    (check_schedule_step, schedule_step, overtaking),
    (check_request_metrics, request_metrics, ttft_from_first_schedule),
    (check_request_metrics, request_metrics, token_at_every_chunk),
])


def _sizes(*args, **kwargs) -> tuple:
    """The sizes of an input: (running, waiting, budgets) or (requests, steps)."""
    if kwargs:
        return (len(kwargs["running"]), len(kwargs["waiting"]), kwargs["max_num_seqs"],
                kwargs["max_num_batched_tokens"], kwargs["num_free_blocks"], kwargs["block_size"])
    return len(args[2]), len(args[0])


@pytest.mark.parametrize("check, right", [(check_schedule_step, schedule_step),
                                          (check_request_metrics, request_metrics)],
                         ids=lambda x: x.__name__)
def test_hidden_cases_have_other_sizes(check, right, capsys) -> None:
    """The hidden random cases differ in size (queues, budgets, requests, steps), not only in
    values."""
    visible = set(inputs_seen(check, [right], summary=_sizes))
    for seed in HIDDEN_SEEDS:
        assert len(set(inputs_seen(check, [right], seed, summary=_sizes)) - visible) >= 5

