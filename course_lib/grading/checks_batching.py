"""Checks for the exercises of chapter 5 (continuous batching).

The references are plain Python written here, not calls into ``course_lib.serving``, so a check
keeps meaning the same thing while the engine changes. They follow the semantics of
:class:`course_lib.serving.scheduler.Scheduler` (the tests compare them with it):

* **one scheduler step** (:func:`reference_schedule_step`): running sequences first, decodes
  before unfinished prompt chunks, each oldest first, each given ``min(pending, budget left)``
  tokens; then waiting prompts oldest first, each admitted only while fewer than
  ``max_num_seqs`` sequences run and its whole prompt fits in the free KV blocks, given
  ``min(prompt, budget left)`` tokens (chunked prefill); the first prompt that cannot be admitted
  stops admission (first come, first served: nobody overtakes it);
* **latency from step records** (:func:`reference_request_metrics`): a request's first token
  comes out at the end of the step in which its last prompt token is computed, and one more
  token at the end of every later step that schedules it; TTFT, inter-token latencies and
  end-to-end latency follow from those times and the arrival time.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence

from course_lib.grading.core import Context, check
from course_lib.serving.engine import StepRecord

POINTS = {"schedule_step": 3, "request_metrics": 2}

#: Random scheduler states per check (seeded: every run checks the same ones; the hidden cases
#: draw as many others, sizes and budgets included, from the instructor's seed).
RANDOM_STATES = 300


# --- one scheduler step ----------------------------------------------------------------------


def reference_schedule_step(running: Sequence[tuple[str, int]], waiting: Sequence[tuple[str, int]],
                            max_num_seqs: int, max_num_batched_tokens: int, num_free_blocks: int,
                            block_size: int) -> list[tuple[str, int]]:
    """What one continuous-batching step schedules: ``[(request_id, tokens)]`` in order.

    ``running``: admitted sequences, oldest first, as ``(request_id, pending_tokens)``; 1 pending
    token is a decode, more is a prompt still being prefilled in chunks. They already hold the
    KV blocks they need. ``waiting``: prompts not admitted yet, oldest first, as
    ``(request_id, prompt_tokens)``; admitting one reserves ``ceil(prompt / block_size)`` blocks.
    """
    budget = max_num_batched_tokens
    out: list[tuple[str, int]] = []
    decodes = [r for r in running if r[1] == 1]
    prefills = [r for r in running if r[1] != 1]
    for request_id, pending in decodes + prefills:
        if budget == 0:
            break
        n = min(pending, budget)
        out.append((request_id, n))
        budget -= n
    num_running, free = len(running), num_free_blocks
    for request_id, prompt in waiting:
        if budget == 0 or num_running >= max_num_seqs:
            break
        blocks = -(-prompt // block_size)
        if blocks > free:
            break  # first come, first served: a later, smaller prompt does not overtake it
        free -= blocks
        num_running += 1
        n = min(prompt, budget)
        out.append((request_id, n))
        budget -= n
    return out


def _schedule_kwargs(running, waiting, seqs, tokens, blocks, block_size) -> dict:
    return {"running": running, "waiting": waiting, "max_num_seqs": seqs,
            "max_num_batched_tokens": tokens, "num_free_blocks": blocks, "block_size": block_size}


def _decodes(*ids: str) -> list[tuple[str, int]]:
    return [(i, 1) for i in ids]


#: (what the case is about, keyword arguments)
SCHEDULE_CASES = [
    ("nothing to do", _schedule_kwargs([], [], 4, 64, 10, 16)),
    ("only decodes: one token each, in the order given", _schedule_kwargs(
        _decodes("a", "b", "c"), [], 4, 64, 10, 16)),
    ("one prompt that fits: it is prefilled whole", _schedule_kwargs(
        [], [("p", 20)], 4, 64, 10, 16)),
    ("decodes, then waiting prompts oldest first", _schedule_kwargs(
        _decodes("a", "b"), [("p", 10), ("q", 5)], 8, 64, 10, 16)),
    ("a prompt over the remaining token budget is chunked (part now, the rest next step)",
     _schedule_kwargs(_decodes("a", "b"), [("p", 100)], 8, 32, 10, 16)),
    ("the budget runs out exactly: the next prompt waits", _schedule_kwargs(
        _decodes("a"), [("p", 15), ("q", 4)], 8, 16, 10, 16)),
    ("a running prompt still being prefilled: decodes go first, then its next chunk",
     _schedule_kwargs([("long", 70), ("a", 1), ("b", 1)], [("p", 8)], 8, 40, 10, 16)),
    ("decodes first even when a running chunk is older and the budget is tight",
     _schedule_kwargs([("long", 50), ("a", 1), ("b", 1), ("c", 1)], [], 8, 16, 10, 16)),
    ("max_num_seqs: no admission while the running sequences fill it", _schedule_kwargs(
        _decodes("a", "b", "c"), [("p", 4), ("q", 4)], 3, 64, 10, 16)),
    ("max_num_seqs counts the prompts admitted in this step too", _schedule_kwargs(
        _decodes("a"), [("p", 4), ("q", 4), ("r", 4)], 3, 64, 10, 16)),
    ("not enough free blocks for the oldest prompt: admission stops (no overtaking)",
     _schedule_kwargs(_decodes("a"), [("big", 40), ("small", 3)], 8, 64, 2, 16)),
    ("blocks are reserved for the whole prompt, even when only a chunk runs now",
     _schedule_kwargs([], [("p", 40), ("q", 10)], 8, 48, 3, 16)),
    ("a prompt of exactly one block needs one block, 17 tokens need two",
     _schedule_kwargs([], [("p", 16), ("q", 17), ("r", 1)], 8, 64, 3, 16)),
    ("more decodes than the token budget: the oldest ones run, the rest wait a step",
     _schedule_kwargs(_decodes("a", "b", "c", "d", "e"), [("p", 3)], 8, 3, 10, 1)),
]


def _hint_schedule(kwargs: dict, got: list[tuple[str, int]], want: list[tuple[str, int]]) -> str:
    """A guess at the mistake, from the wrong variants a learner is most likely to write."""
    running, waiting = kwargs["running"], kwargs["waiting"]
    budget = kwargs["max_num_batched_tokens"]
    got_ids = [r for r, _ in got]
    running_ids = [r for r, _ in running]
    if sum(n for _, n in got) > budget:
        return f"; {sum(n for _, n in got)} tokens exceed max_num_batched_tokens={budget}"
    started = [r for r in got_ids if r not in running_ids]
    if len(running) + len(started) > kwargs["max_num_seqs"]:
        return (f"; {len(running)} running + {len(started)} admitted exceeds "
                f"max_num_seqs={kwargs['max_num_seqs']}")
    want_ids = [r for r, _ in want]
    decodes = [r for r, pending in running if pending == 1]
    for r, pending in running:
        if pending > 1 and r in got_ids and any(
                d not in got_ids or got_ids.index(d) > got_ids.index(r) for d in decodes):
            return f"; decodes first: {r!r} (a prompt still being prefilled) was scheduled " \
                   "before a running decode (each decode needs only one token of the budget)"
    if sorted(got_ids) == sorted(want_ids) and got_ids != want_ids:
        return "; the right requests in the wrong order: decodes first, then prefill chunks, " \
               "then waiting prompts, oldest first within each"
    sizes = dict(waiting)
    for r, n in want:
        if r in sizes and n < sizes[r] and r not in got_ids:
            return f"; {r!r} does not fit in the budget left, so it should get a chunk of {n} " \
                   "tokens now (chunked prefill), not wait"
    blocks = sum(-(-sizes[r] // kwargs["block_size"]) for r in started if r in sizes)
    if blocks > kwargs["num_free_blocks"]:
        return f"; the prompts admitted need {blocks} blocks, only {kwargs['num_free_blocks']} " \
               "are free (a whole prompt's blocks are reserved when it is admitted)"
    if any(w in got_ids and w not in want_ids for w, _ in waiting):
        return "; a waiting prompt that cannot be admitted stops admission: later prompts do " \
               "not overtake it"
    return ""


def _normalise_schedule(ctx: Context, got) -> list[tuple[str, int]]:
    if not isinstance(got, (list, tuple)):
        ctx.fail(f"expected a list of (request_id, tokens) pairs, got {type(got).__name__}")
    out = []
    for item in got:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            ctx.fail(f"every item must be a (request_id, tokens) pair, got {item!r}")
        request_id, n = item
        if isinstance(n, bool) or not isinstance(n, int):
            ctx.fail(f"tokens must be an int, got {n!r} for {request_id!r}")
        out.append((request_id, n))
    return out


def _describe_state(kwargs: dict) -> str:
    return (f"running={kwargs['running']}, waiting={kwargs['waiting']}, "
            f"max_num_seqs={kwargs['max_num_seqs']}, "
            f"max_num_batched_tokens={kwargs['max_num_batched_tokens']}, "
            f"num_free_blocks={kwargs['num_free_blocks']}, block_size={kwargs['block_size']}")


def _compare_schedule(ctx: Context, fn, kwargs: dict) -> None:
    want = reference_schedule_step(**kwargs)
    copies = {k: (list(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    got = _normalise_schedule(ctx, fn(**copies))
    if copies["running"] != kwargs["running"] or copies["waiting"] != kwargs["waiting"]:
        ctx.fail("your function changed the running or waiting list it was given")
    if got != want:
        ctx.fail(f"expected {want}, got {got}{_hint_schedule(kwargs, got, want)}")


def random_schedule_state(rng: random.Random) -> dict:
    """A random but valid scheduler state (like the engine's: budget >= max_num_seqs)."""
    block_size = rng.choice([1, 2, 4, 8, 16])
    max_num_seqs = rng.randint(1, 8)
    tokens = rng.randint(max(max_num_seqs, block_size), 96)
    n_running = rng.randint(0, max_num_seqs)
    running = []
    for i in range(n_running):
        pending = 1 if rng.random() < 0.75 else rng.randint(2, 120)
        running.append((f"r{i}", pending))
    waiting = [(f"w{i}", rng.randint(1, 120)) for i in range(rng.randint(0, 6))]
    return _schedule_kwargs(running, waiting, max_num_seqs, tokens, rng.randint(0, 30), block_size)


@check("one scheduler step with budgets", POINTS["schedule_step"])
def check_schedule_step(ctx: Context, fn) -> None:
    """``fn(running, waiting, max_num_seqs, max_num_batched_tokens, num_free_blocks, block_size)``
    returns ``[(request_id, tokens)]``, as :func:`reference_schedule_step` (keyword arguments).

    Checked on fixed cases, each about one rule, then on :data:`RANDOM_STATES` seeded random
    states, where the answer must also respect the budgets (tokens, sequences, blocks). The
    hidden cases are the same fixed cases and as many other random states.
    """
    for label, kwargs in SCHEDULE_CASES:
        ctx.case = f"{label} ({_describe_state(kwargs)})"
        _compare_schedule(ctx, fn, kwargs)
    rng = ctx.rng(501)  # hidden mode: other states, of other sizes and budgets
    for i in range(RANDOM_STATES):
        kwargs = random_schedule_state(rng)
        ctx.case = f"random state {i} ({_describe_state(kwargs)})"
        _compare_schedule(ctx, fn, kwargs)


# --- latency from step records ---------------------------------------------------------------


def reference_request_metrics(steps: Sequence[StepRecord], arrival_times: Mapping[str, float],
                              prompt_lens: Mapping[str, int]) -> dict[str, dict]:
    """``{request_id: {"ttft": s, "itl": [s, ...], "e2e": s}}`` for every request that got a token.

    A request's token times are the ``end`` of the step in which its computed tokens reach its
    prompt length (the first token), then the ``end`` of every later step that schedules it
    (one decoded token each). No preemption is assumed.
    """
    computed: dict[str, int] = {}
    times: dict[str, list[float]] = {}
    for step in steps:
        for request_id, n in step.scheduled:
            before = computed.get(request_id, 0)
            computed[request_id] = before + n
            if before >= prompt_lens[request_id]:
                times[request_id].append(step.end)  # a decode step
            elif before + n >= prompt_lens[request_id]:
                times[request_id] = [step.end]  # the last chunk of the prompt
    out = {}
    for request_id, t in times.items():
        arrival = arrival_times[request_id]
        out[request_id] = {"ttft": t[0] - arrival, "itl": [b - a for a, b in itertools.pairwise(t)],
                           "e2e": t[-1] - arrival}
    return out


def simulate_steps(rng: random.Random, requests: dict[str, tuple[int, int, float]],
                   max_num_seqs: int, max_num_batched_tokens: int) -> list[StepRecord]:
    """Step records of a scheduler run (:func:`reference_schedule_step`, blocks unlimited).

    ``requests``: ``{id: (prompt tokens, output tokens, arrival time)}``; step durations are
    random, and a request joins the waiting queue at the first step starting after its arrival.
    """
    order = sorted(requests, key=lambda r: requests[r][2])
    pending: dict[str, int] = {}
    produced: dict[str, int] = {}
    running: list[str] = []
    waiting: list[str] = []
    steps, now = [], 0.0
    while order or running or waiting:
        while order and requests[order[0]][2] <= now:
            waiting.append(order.pop(0))
        if not running and not waiting:
            now = requests[order[0]][2]
            continue
        plan = reference_schedule_step([(r, pending[r]) for r in running],
                                       [(r, requests[r][0]) for r in waiting], max_num_seqs,
                                       max_num_batched_tokens, 10**9, 16)
        end = now + rng.uniform(0.005, 0.05) * (1 + sum(n for _, n in plan) / 32)
        steps.append(StepRecord(now, end, plan))
        for r, n in plan:
            if r in waiting:
                waiting.remove(r)
                running.append(r)
                pending[r], produced[r] = requests[r][0], 0
            pending[r] -= n
            if pending[r] == 0:
                produced[r] += 1
                pending[r] = 1
                if produced[r] == requests[r][1]:
                    running.remove(r)
        now = end + rng.uniform(0.0, 0.003)
    return steps


def _metric_cases() -> list[tuple[str, list[StepRecord], dict[str, float], dict[str, int]]]:
    s = StepRecord
    return [
        ("one request, prompt in one step, then two decodes",
         [s(1.0, 1.5, [("a", 6)]), s(1.5, 1.6, [("a", 1)]), s(1.6, 1.8, [("a", 1)])],
         {"a": 0.25}, {"a": 6}),
        ("a prompt chunked over three steps: no token before the last chunk",
         [s(0.0, 0.2, [("a", 4)]), s(0.2, 0.4, [("a", 4)]), s(0.4, 0.5, [("a", 2)]),
          s(0.5, 0.55, [("a", 1)])],
         {"a": 0.0}, {"a": 10}),
        ("a request that waits: TTFT counts from its arrival, not from its first step",
         [s(0.0, 0.3, [("a", 5)]), s(0.3, 0.35, [("a", 1), ("b", 3)]),
          s(0.35, 0.4, [("a", 1), ("b", 1)])],
         {"a": 0.0, "b": 0.1}, {"a": 5, "b": 3}),
        ("one token only: no inter-token latencies, E2E = TTFT",
         [s(2.0, 2.25, [("a", 7), ("b", 2)]), s(2.25, 2.5, [("b", 1)])],
         {"a": 1.5, "b": 2.0}, {"a": 7, "b": 2}),
        ("steps that skip a request (token budget spent elsewhere) lengthen its ITL",
         [s(0.0, 0.1, [("a", 2)]), s(0.1, 0.4, [("b", 8)]), s(0.4, 0.5, [("a", 1), ("b", 1)])],
         {"a": 0.0, "b": 0.0}, {"a": 2, "b": 8}),
    ]


def _compare_metrics(ctx: Context, fn, steps, arrivals, prompt_lens) -> None:
    want = reference_request_metrics(steps, arrivals, prompt_lens)
    got = fn(list(steps), dict(arrivals), dict(prompt_lens))
    if not isinstance(got, Mapping):
        ctx.fail(f"expected a dict {{request_id: {{'ttft', 'itl', 'e2e'}}}}, got {type(got).__name__}")
    if set(got) != set(want):
        ctx.fail(f"expected metrics for requests {sorted(want)}, got {sorted(got)}")
    for request_id, w in want.items():
        g = got[request_id]
        if not isinstance(g, Mapping) or not {"ttft", "itl", "e2e"} <= set(g):
            ctx.fail(f"request {request_id!r}: expected a dict with keys 'ttft', 'itl', 'e2e', "
                     f"got {g!r}")
        for key in ("ttft", "e2e"):
            value = g[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isclose(value, w[key], rel_tol=1e-9, abs_tol=1e-9):
                hint = ""
                if key == "ttft":
                    hint = (" (the first token comes out at the END of the step that computes "
                            "the last prompt token, not after an earlier prefill chunk; time "
                            "counts from the ARRIVAL)")
                ctx.fail(f"request {request_id!r}: {key} expected {w[key]:.6g}, got {value!r}{hint}")
        itl = g["itl"]
        if not isinstance(itl, (list, tuple)) or len(itl) != len(w["itl"]) or not all(
                isinstance(x, (int, float)) and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
                for x, y in zip(itl, w["itl"], strict=True)):
            ctx.fail(f"request {request_id!r}: itl expected "
                     f"{[round(x, 6) for x in w['itl']]}, got {itl!r} (one gap per pair of "
                     "consecutive tokens; a prefill chunk that does not finish the prompt "
                     "produces no token)")


@check("latency metrics from step records", POINTS["request_metrics"])
def check_request_metrics(ctx: Context, fn) -> None:
    """``fn(steps, arrival_times, prompt_lens) -> {request_id: {"ttft", "itl", "e2e"}}``.

    ``steps``: :class:`~course_lib.serving.engine.StepRecord` objects (``start``, ``end``,
    ``scheduled = [(request_id, tokens)]``); ``arrival_times`` and ``prompt_lens`` map request
    ids to seconds and prompt tokens. Checked on fixed cases, then on seeded simulated runs of
    a scheduler, against :func:`reference_request_metrics`. The hidden cases are the same fixed
    cases and other simulated runs (other requests, budgets and step times).
    """
    for label, steps, arrivals, prompt_lens in _metric_cases():
        ctx.case = label
        _compare_metrics(ctx, fn, steps, arrivals, prompt_lens)
    rng = ctx.rng(502)  # hidden mode: other runs, with other numbers of requests and budgets
    for i in range(20):
        requests = {f"q{j}": (rng.randint(1, 60), rng.randint(1, 12), rng.uniform(0.0, 0.5))
                    for j in range(rng.randint(1, 10))}
        seqs = rng.randint(1, 6)
        tokens = rng.randint(max(seqs, 16), 64)
        steps = simulate_steps(rng, requests, seqs, tokens)
        ctx.case = (f"simulated run {i}: {len(requests)} requests, max_num_seqs={seqs}, "
                    f"max_num_batched_tokens={tokens}, {len(steps)} steps")
        _compare_metrics(ctx, fn, steps, {r: v[2] for r, v in requests.items()},
                         {r: v[0] for r, v in requests.items()})
