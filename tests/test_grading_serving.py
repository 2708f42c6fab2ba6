"""Chapter 8's checks (deployment and cost) and chapter 9's deployment choice: right answers
pass, plausible wrong ones fail, stubs are reported; the references agree with the load
generator, the cost module and the running server (every validation case is sent to the real
app)."""

from __future__ import annotations

import math
import random

import httpx
import pytest
from check_contract import (
    HIDDEN_SEEDS,
    contract_tests,
    hidden_contract_tests,
    inputs_seen,
    memorize,
    visible_and_hidden_inputs,
)
from test_api import serve

from course_lib import cost, grading
from course_lib.grading import (
    TASKS,
    check_choose_deployment,
    check_cost,
    check_latency_metrics,
    check_request_validator,
)
from course_lib.grading import checks_serving as cs
from course_lib.grading.core import Context, mix_seed
from course_lib.models.hub import load_model
from course_lib.serving import loadgen


class Pair(tuple):
    """Two learner functions passed to one check, with a name for test ids."""

    def __new__(cls, name, *fns):
        pair = super().__new__(cls, fns)
        pair.__name__ = name
        return pair


def two_function_check(check):
    """``check(request_latency, goodput)`` as a one-argument check over a :class:`Pair`."""
    def run(learner, raise_on_fail: bool = True):
        if callable(learner):  # the stub: both functions raise NotImplementedError
            learner = (learner, learner)
        return check(*learner, raise_on_fail=raise_on_fail)

    run.task_name, run.points, run.__name__ = check.task_name, check.points, check.__name__
    return run


latency_check = two_function_check(check_latency_metrics)

# --- right answers ---------------------------------------------------------------------------


def request_latency(start, token_times, end, output_tokens=None):
    ttft = token_times[0] - start
    e2e = end - start
    n = output_tokens if output_tokens else len(token_times)
    itl = [token_times[i] - token_times[i - 1] for i in range(1, len(token_times))]
    return {"ttft": ttft, "e2e": e2e, "itl": itl, "tpot": None if n < 2 else (e2e - ttft) / (n - 1)}


def goodput(requests, slos, duration):
    def ok(r):
        return all(r[k] <= v for k, v in slos.items() if not (k == "tpot" and r[k] is None))
    return sum(1 for r in requests if r["success"] and r["ttft"] is not None and ok(r)) / duration


def cost_per_million_tokens(gpu_hourly_usd, tokens_per_second, utilization=1.0):
    if tokens_per_second <= 0 or not 0 < utilization <= 1:
        raise ValueError("tokens_per_second must be > 0 and utilization in (0, 1]")
    tokens_per_hour = tokens_per_second * 3600 * utilization
    return gpu_hourly_usd / tokens_per_hour * 1_000_000


def validate_completion(body, model_name, context_len, count_tokens):
    """Written as a learner would: a list of (condition, status, param) checks in order."""
    def err(status, param, message):
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return status, {"error": {"message": message, "type": kind, "param": param, "code": None}}

    def number(v):
        return type(v) in (int, float)

    t, p = body.get("temperature"), body.get("top_p")
    if t is not None and not (number(t) and 0 <= t <= 2):
        return err(400, "temperature", "temperature must be in [0, 2]")
    if p is not None and not (number(p) and 0 < p <= 1):
        return err(400, "top_p", "top_p must be in (0, 1]")
    n = body.get("n", 1)
    if type(n) is not int or not 1 <= n <= 16:
        return err(400, "n", "n must be 1..16")
    if "prompt" not in body:
        return err(400, "prompt", "prompt is required")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is not None and type(max_tokens) is not int:
        return err(400, "max_tokens", "max_tokens must be an integer")
    if body.get("model") not in (None, model_name):
        return err(404, "model", f"unknown model {body['model']!r}")
    tokens = count_tokens(body["prompt"])
    if tokens == 0:
        return err(400, "prompt", "empty prompt")
    stop = body.get("stop") or []
    if len([stop] if isinstance(stop, str) else stop) > 4:
        return err(400, "stop", "at most 4 stop strings")
    if max_tokens is None:
        max_tokens = max(1, context_len - tokens)
    if max_tokens < 1:
        return err(400, "max_tokens", "max_tokens must be >= 1")
    if tokens + max_tokens > context_len:
        return err(400, "prompt" if tokens >= context_len else "max_tokens", "too long")
    return None


# --- plausible wrong answers -----------------------------------------------------------------


def tpot_over_all_tokens(start, token_times, end, output_tokens=None):
    out = request_latency(start, token_times, end, output_tokens)
    n = output_tokens or len(token_times)
    out["tpot"] = out["e2e"] / n if n > 1 else None
    return out


def tpot_counts_chunks(start, token_times, end, output_tokens=None):
    return request_latency(start, token_times, end, None)


def itl_from_start(start, token_times, end, output_tokens=None):
    out = request_latency(start, token_times, end, output_tokens)
    out["itl"] = [b - a for a, b in zip([start, *token_times], token_times, strict=False)]
    return out


def goodput_as_fraction(requests, slos, duration):
    ok = [r for r in requests if r["success"] and r["ttft"] is not None]
    return goodput(requests, slos, duration) * duration / len(ok) if ok else 0.0


def goodput_strict(requests, slos, duration):  # < instead of <=
    return sum(1 for r in requests if r["success"] and r["ttft"] is not None and all(
        (k == "tpot" and r[k] is None) or r[k] < v for k, v in slos.items())) / duration


def goodput_counts_failures(requests, slos, duration):
    return sum(1 for r in requests if r["ttft"] is None or all(
        (k == "tpot" and r[k] is None) or r[k] <= v for k, v in slos.items())) / duration


def cost_times_utilization(gpu_hourly_usd, tokens_per_second, utilization=1.0):
    return cs.reference_cost_per_million_tokens(gpu_hourly_usd, tokens_per_second) * utilization


def cost_per_thousand(gpu_hourly_usd, tokens_per_second, utilization=1.0):
    return cs.reference_cost_per_million_tokens(gpu_hourly_usd, tokens_per_second, utilization) / 1000


def cost_without_checks(gpu_hourly_usd, tokens_per_second, utilization=1.0):
    return gpu_hourly_usd / (tokens_per_second * 3600) * 1e6 / utilization


def _validator_variant(name, change):
    def fn(body, model_name, context_len, count_tokens):
        return change(body, model_name, context_len, count_tokens)
    fn.__name__ = name
    return fn


def _blame_max_tokens(body, model_name, context_len, count_tokens):
    out = validate_completion(body, model_name, context_len, count_tokens)
    if out and out[1]["error"]["param"] == "prompt" and out[0] == 400 and "prompt" in body and \
            count_tokens(body["prompt"]) >= context_len:
        out[1]["error"]["param"] = "max_tokens"
    return out


def _model_first(body, model_name, context_len, count_tokens):
    if body.get("model") not in (None, model_name):
        return 404, {"error": {"message": "unknown model", "type": "not_found_error",
                               "param": "model", "code": None}}
    return validate_completion(body, model_name, context_len, count_tokens)


def _bools_are_ints(body, model_name, context_len, count_tokens):
    body = {k: (int(v) if isinstance(v, bool) else v) for k, v in body.items()}
    return validate_completion(body, model_name, context_len, count_tokens)


def _model_400(body, model_name, context_len, count_tokens):
    out = validate_completion(body, model_name, context_len, count_tokens)
    if out and out[0] == 404:
        return 400, {"error": {**out[1]["error"], "type": "invalid_request_error"}}
    return out


def _default_max_tokens_ignored(body, model_name, context_len, count_tokens):
    if "max_tokens" not in body:
        body = {**body, "max_tokens": None}
    return validate_completion(body, model_name, context_len, count_tokens)


def _characters_as_tokens(body, model_name, context_len, count_tokens):
    return validate_completion(body, model_name, context_len, len)


blames_max_tokens = _validator_variant("blames_max_tokens", _blame_max_tokens)
model_checked_first = _validator_variant("model_checked_first", _model_first)
bools_are_ints = _validator_variant("bools_are_ints", _bools_are_ints)
unknown_model_is_400 = _validator_variant("unknown_model_is_400", _model_400)
default_max_tokens_ignored = _validator_variant("default_max_tokens_ignored",
                                                _default_max_tokens_ignored)
characters_as_tokens = _validator_variant("characters_as_tokens", _characters_as_tokens)


def returns_a_string(body, model_name, context_len, count_tokens):
    out = validate_completion(body, model_name, context_len, count_tokens)
    return out and (out[0], out[1]["error"]["message"])


RIGHT = {
    latency_check: [Pair("student_pair", request_latency, goodput),
                    Pair("reference_pair", cs.reference_request_latency, cs.reference_goodput)],
    check_cost: [cost_per_million_tokens, cs.reference_cost_per_million_tokens,
                 cost.cost_per_million_tokens],
    check_request_validator: [validate_completion, cs.reference_validate_completion],
}

WRONG = [
    (latency_check, Pair("tpot_over_all_tokens", tpot_over_all_tokens, goodput),
     "TPOT leaves out the first token"),
    (latency_check, Pair("tpot_counts_chunks", tpot_counts_chunks, goodput),
     "n is output_tokens when it is given"),
    (latency_check, Pair("itl_from_start", itl_from_start, goodput), "nothing from start"),
    (latency_check, Pair("goodput_as_fraction", request_latency, goodput_as_fraction),
     "not a fraction"),
    (latency_check, Pair("goodput_strict", request_latency, goodput_strict), "exactly its limit"),
    (latency_check, Pair("goodput_counts_failures", request_latency, goodput_counts_failures),
     "a failed request never counts"),
    (check_cost, cost_times_utilization, "utilization DIVIDES"),
    (check_cost, cost_per_thousand, "per MILLION tokens"),
    (check_cost, cost_without_checks, "raise ValueError"),
    (check_request_validator, blames_max_tokens, "expected 400 with param 'prompt', got 400 with "
                                                 "param 'max_tokens'"),
    (check_request_validator, model_checked_first, "before the unknown model"),
    (check_request_validator, bools_are_ints, "a bool"),
    (check_request_validator, unknown_model_is_400, "expected 404 with param 'model', got 400"),
    (check_request_validator, default_max_tokens_ignored, "the default 16 counts"),
    (check_request_validator, characters_as_tokens, "context"),
    (check_request_validator, returns_a_string, "the OpenAI error shape"),
]


def not_implemented(*args, **kwargs):
    raise NotImplementedError()


test_right_answer_passes, test_wrong_answer_fails, test_not_implemented_is_reported = \
    contract_tests(RIGHT, WRONG, not_implemented)


def test_points_and_registry() -> None:
    tasks = {k: t for k, t in TASKS.items() if t.notebook == "08_deployment_and_cost"}
    assert list(tasks) == ["08.latency_metrics", "08.cost", "08.request_validator"]
    assert [t.check for t in tasks.values()] == [check_latency_metrics, check_cost,
                                                 check_request_validator]
    assert [t.points for t in tasks.values()] == [2, 1, 2]
    assert tasks["08.latency_metrics"].names == ("request_latency", "goodput")


def test_grade_reports_missing_names(capsys) -> None:
    results = grading.grade({"request_latency": request_latency, "goodput": goodput,
                             "cost_per_million_tokens": cost_per_million_tokens},
                            "08_deployment_and_cost")
    assert [r.passed for r in results] == [True, True, False]
    assert "validate_completion is not defined" in results[2].message


def test_learner_code_that_crashes_is_reported(capsys) -> None:
    def crashes(body, model_name, context_len, count_tokens):
        return body["prompt"].upper() + 1

    result = check_request_validator(crashes, raise_on_fail=False)
    assert not result.passed and "TypeError" in result.message


# --- the references follow the library -------------------------------------------------------


def test_latency_reference_matches_loadgen() -> None:
    rng = random.Random(0)
    cases = [c[1:] for c in cs.LATENCY_CASES] + [cs.random_latency_case(rng) for _ in range(500)]
    for start, times, end, n in cases:
        ours = cs.reference_request_latency(start, times, end, n)
        theirs = loadgen.latency_metrics(start, times, end, n)
        assert ours.keys() == theirs.keys()
        assert ours["ttft"] == theirs["ttft"] and ours["e2e"] == theirs["e2e"]
        assert ours["itl"] == pytest.approx(theirs["itl"])
        assert (ours["tpot"] is None) == (theirs["tpot"] is None)
        assert ours["tpot"] is None or ours["tpot"] == pytest.approx(theirs["tpot"])


def _random_results(rng: random.Random) -> list[loadgen.RequestResult]:
    out = []
    for _ in range(rng.randint(0, 25)):
        start = rng.uniform(0, 10)
        times, t = [], start
        for _ in range(rng.choice([0, 1, 1, 2, 5, 12])):
            t += rng.expovariate(8)
            times.append(t)
        out.append(loadgen.RequestResult(
            success=rng.random() < 0.85, output_tokens=len(times) + rng.choice([0, 0, 3]),
            start=start, token_times=times, end=t + rng.uniform(0, 0.05)))
    return out


def test_goodput_reference_matches_summarize() -> None:
    """On random load-generator results: goodput of the dicts run_load writes == summarize's."""
    rng = random.Random(1)
    for _ in range(300):
        results = _random_results(rng)
        _, slos, duration = cs.random_goodput_case(rng)
        requests = []
        for r in results:  # as run_load writes result["requests"]
            m = r.metrics() or {"ttft": None, "tpot": None}
            requests.append({"success": r.success, "ttft": m["ttft"], "tpot": m["tpot"],
                             "e2e": r.end - r.start})
        want = loadgen.summarize(results, duration, slos)["goodput"]
        assert cs.reference_goodput(requests, slos, duration) == pytest.approx(want)


def test_cost_reference_matches_the_cost_module() -> None:
    rng = random.Random(2)
    for _ in range(200):
        args = (rng.uniform(0, 10), rng.uniform(0.1, 1e4), rng.uniform(0.01, 1))
        assert cs.reference_cost_per_million_tokens(*args) == pytest.approx(
            cost.cost_per_million_tokens(*args))
    assert cs.reference_cost_per_million_tokens(2.5, 50) == pytest.approx(13.8889, abs=1e-4)
    for _, args in cs.COST_ERRORS:
        with pytest.raises(ValueError):
            cost.cost_per_million_tokens(*args)


# --- the validator reference follows the real server -----------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def _repeat_token_prompt(tokenizer):
    """prompt_of(n): a text of exactly n tokens for this tokenizer."""
    for word in (" self", " return", " the", " x"):
        if all(len(tokenizer.encode(word * n)) == n for n in (1, 2, 7, 100, 600)):
            return lambda n: word * n
    raise AssertionError("no word repeats as one token each")


def test_validator_reference_matches_the_server(tiny) -> None:
    """Every fixed case and 150 random bodies go to the real app; status and param agree."""
    model, tokenizer = tiny
    context = model.config.n_positions
    prompt_of = _repeat_token_prompt(tokenizer)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    rng = random.Random(3)
    bodies = [b for _, b in cs.request_cases(context, prompt_of, "tiny")]
    bodies += [cs.random_request(rng, context, prompt_of, "tiny") for _ in range(150)]
    # the hidden cases' wider choice of values, drawn as a hidden seed draws them
    rng = random.Random(mix_seed(803, 1))
    bodies += [cs.random_request(rng, context, prompt_of, "tiny", wide=True) for _ in range(150)]
    statuses = set()
    with serve(tiny, num_blocks=128) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for body in bodies:
            want = cs.reference_validate_completion(body, "tiny", context, count)
            # streamed, and closed at once: only the status matters, no tokens are generated
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                status = response.status_code
                payload = response.read() if status != 200 else None
            statuses.add(status)
            if want is None:
                assert status == 200, (body, payload)
            else:
                error = httpx.Response(status, content=payload).json()["error"]
                assert (status, error["param"], error["type"]) == \
                    (want[0], want[1]["error"]["param"], want[1]["error"]["type"]), body
    assert statuses == {200, 400, 404}


def test_char_tokens_and_cases_are_well_formed() -> None:
    assert cs.char_tokens("") == 0 and cs.char_tokens("abcd" * 5) == 5 and cs.char_tokens("abcde") == 2
    labels = [label for label, _ in cs.request_cases(64, lambda n: "abcd" * n, "tiny")]
    assert len(labels) == len(set(labels))
    assert not math.isnan(cs.reference_goodput([], {"ttft": 1.0}, 1.0))


# --- hidden cases (course-lib grade --hidden) -------------------------------------------------


def accepts_everything(body, model_name, context_len, count_tokens):
    return None


# the latency check takes its Pair of functions as two arguments
test_hidden_right_answer_passes, test_hardcoding_fails_hidden = hidden_contract_tests(
    {check_latency_metrics: RIGHT[latency_check], check_cost: RIGHT[check_cost],
     check_request_validator: RIGHT[check_request_validator]}, [
        (check_request_validator, validate_completion, accepts_everything),
        (check_cost, cost_per_million_tokens, cost_per_thousand),
    ])


#: The visible cost cases, answered: what a submission that hard-codes them would hold.
VISIBLE_COSTS = {(hourly, tps, 1.0 if util is None else util):
                 cs.reference_cost_per_million_tokens(hourly, tps, 1.0 if util is None else util)
                 for _, hourly, tps, util in cs.cost_cases(Context())}


def cost_from_a_table(gpu_hourly_usd, tokens_per_second, utilization=1.0):
    """A dict of every visible case's answer, and a wrong formula for anything else."""
    if tokens_per_second <= 0 or not 0 < utilization <= 1:
        raise ValueError("impossible inputs")
    key = (gpu_hourly_usd, tokens_per_second, utilization)
    return VISIBLE_COSTS.get(key, gpu_hourly_usd / tokens_per_second)


def test_cost_answers_from_a_table_fail_every_hidden_seed(capsys) -> None:
    """The grader's "hard-coded answers" fixture: a table of the visible cases passes them, and
    fails the hidden cases whatever the instructor's seed."""
    assert len(VISIBLE_COSTS) == len(cs.COST_CASES) + 50
    assert check_cost(cost_from_a_table).passed
    for seed in [*HIDDEN_SEEDS, *range(2, 40)]:
        result = check_cost(cost_from_a_table, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case, random case"), seed


def test_hardcoded_latency_metrics_fail_hidden(capsys) -> None:
    latency, good = memorize(check_latency_metrics, (request_latency, goodput),
                             (tpot_over_all_tokens, goodput_as_fraction))
    for seed in HIDDEN_SEEDS:
        result = check_latency_metrics(latency, good, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case, request_latency, random")
        # with a right request_latency, the memorized goodput fails on its own
        result = check_latency_metrics(request_latency, good, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case, goodput, random")


def test_hidden_validator_varies_context_model_and_prompt(capsys) -> None:
    def summary(body, model_name, context_len, count_tokens):
        return model_name, context_len, body.get("prompt", "")[:4]

    seen = [set(inputs_seen(check_request_validator, [validate_completion], seed, summary=summary))
            for seed in (None, *HIDDEN_SEEDS)]
    visible = seen[0]
    assert {(m, c) for m, c, _ in visible} == {("tiny", 64)}
    for calls in seen[1:]:
        assert len({(m, c) for m, c, _ in calls}) == 2  # visible pass, then the hidden one
        assert {p for _, _, p in calls} - {p for _, _, p in visible}


@pytest.mark.parametrize("check, learners", [
    (check_latency_metrics, (request_latency, goodput)), (check_cost, (cost_per_million_tokens,)),
    (check_request_validator, (validate_completion,))],
    ids=["latency_metrics", "cost", "request_validator"])
def test_hidden_cases_depend_on_the_seed(check, learners, capsys) -> None:
    """Each instructor's seed gives its own cases (beyond the hand-written ones)."""
    (visible, a), (_, b) = (map(set, visible_and_hidden_inputs(check, learners, seed))
                            for seed in HIDDEN_SEEDS)
    assert a - visible and b - visible and a - visible - b and b - visible - a


# --- chapter 9: choosing a deployment -------------------------------------------------------


def choose_deployment(candidates, *, max_weight_gb, max_quality_loss, min_tokens_per_s,
                      baseline="fp32"):
    """Written as a learner would: find the baseline, filter, sort."""
    base = [c["perplexity"] for c in candidates if c["name"] == baseline]
    if not base:
        raise ValueError(f"no candidate named {baseline!r}")
    ok = [c for c in candidates if c["weight_gb"] <= max_weight_gb
          and (c["perplexity"] - base[0]) / base[0] <= max_quality_loss
          and c["tokens_per_s"] >= min_tokens_per_s]
    ok.sort(key=lambda c: (c["usd_per_million"], c["weight_gb"], c["name"]))
    return ok[0] if ok else None


def _deploy_variant(name, *, strict=False, quality=True, tie_break=True, copy=False):
    def fn(candidates, *, max_weight_gb, max_quality_loss, min_tokens_per_s, baseline="fp32"):
        base = [c["perplexity"] for c in candidates if c["name"] == baseline]
        if not base:
            raise ValueError(f"no candidate named {baseline!r}")

        def within(value, limit):
            return value < limit if strict else value <= limit

        ok = [c for c in candidates if within(c["weight_gb"], max_weight_gb)
              and (not quality or within(c["perplexity"] / base[0] - 1, max_quality_loss))
              and within(min_tokens_per_s, c["tokens_per_s"])]
        key = (lambda c: (c["usd_per_million"], c["weight_gb"], c["name"])) if tie_break \
            else (lambda c: c["usd_per_million"])
        best = min(ok, key=key, default=None)
        return dict(best) if copy and best is not None else best
    fn.__name__ = name
    return fn


strict_limits = _deploy_variant("strict_limits", strict=True)
no_tie_break = _deploy_variant("no_tie_break", tie_break=False)
cheapest_ignoring_quality = _deploy_variant("cheapest_ignoring_quality", quality=False)
returns_a_copy = _deploy_variant("returns_a_copy", copy=True)


def tie_break_by_name_only(candidates, **kwargs):
    # right filter, but a price tie goes to the name alone: the weight is never looked at
    tied = sorted(candidates, key=lambda c: (c["usd_per_million"], c["name"]))
    best = choose_deployment(tied, **kwargs)
    if best is None:
        return None
    return min((c for c in tied if c["usd_per_million"] == best["usd_per_million"]
                and choose_deployment([c, *[x for x in tied if x["name"] == kwargs.get(
                    "baseline", "fp32")]], **kwargs) is not None), key=lambda c: c["name"])


def returns_the_name(candidates, **kwargs):
    best = choose_deployment(candidates, **kwargs)
    return best and best["name"]


def baseline_missing_gives_none(candidates, **kwargs):
    if not any(c["name"] == kwargs.get("baseline", "fp32") for c in candidates):
        return None
    return choose_deployment(candidates, **kwargs)


def sorts_in_place(candidates, **kwargs):
    candidates.sort(key=lambda c: c["usd_per_million"])
    return choose_deployment(candidates, **kwargs)


(test_choose_right_answer_passes, test_choose_wrong_answer_fails,
 test_choose_not_implemented_is_reported) = contract_tests(
    {check_choose_deployment: [choose_deployment, returns_a_copy, cost.choose_deployment]}, [
        (check_choose_deployment, strict_limits, "the limits are inclusive"),
        (check_choose_deployment, no_tie_break, "a price tie goes to the smaller weight_gb"),
        (check_choose_deployment, cheapest_ignoring_quality, "within max_quality_loss"),
        (check_choose_deployment, tie_break_by_name_only, "a price tie goes to the smaller "),
        (check_choose_deployment, returns_the_name, "not its name"),
        (check_choose_deployment, baseline_missing_gives_none, "should raise ValueError"),
        (check_choose_deployment, sorts_in_place, "changed the candidates"),
    ], not_implemented)

(test_choose_hidden_right_answer_passes, test_choose_hardcoding_fails_hidden) = \
    hidden_contract_tests({check_choose_deployment: [choose_deployment, cost.choose_deployment]},
                          [(check_choose_deployment, choose_deployment, cheapest_ignoring_quality)])


def test_choose_deployment_registry_and_wrong_messages_name_the_case(capsys) -> None:
    tasks = {k: t for k, t in TASKS.items() if t.notebook == "09_end_to_end"}
    assert list(tasks) == ["09.choose_deployment"]
    task = tasks["09.choose_deployment"]
    assert (task.names, task.check, task.points) == (("choose_deployment",),
                                                     check_choose_deployment, 2)
    # the first fixed case each mistake meets is the one made for it
    result = check_choose_deployment(strict_limits, raise_on_fail=False)
    assert result.message.startswith("the baseline itself loses nothing, so a 0 quality budget")
    assert "expected 'fp32', got None (the limits are inclusive" in result.message
    result = check_choose_deployment(no_tie_break, raise_on_fail=False)
    assert result.message.startswith("a price tie goes to the smaller weight_gb")
    result = check_choose_deployment(cheapest_ignoring_quality, raise_on_fail=False)
    assert result.message.startswith("worked example") and "expected 'int8', got 'int3'" in \
        result.message


def test_deployment_cases_cover_the_edges() -> None:
    """The visible cases reach every outcome the exercise is about, random ones included."""
    cases = cs.deployment_cases(Context())
    picks = [cost.choose_deployment(o, **lim) for _, o, lim in cases]
    random_picks = picks[len(cs.DEPLOY_CASES):]
    assert sum(p is None for p in random_picks) >= 10
    assert sum(p is not None for p in random_picks) >= 60
    # a limit exactly at the winner's value: a strict rule would have picked something else
    strict = [cs._alternative(o, lim, strict=True) for _, o, lim in cases]
    assert sum(s != (p and p["name"]) for s, p in zip(strict, picks, strict=True)) >= 15
    no_ties = [cs._alternative(o, lim, tie_break=False) for _, o, lim in cases]
    assert sum(t != (p and p["name"]) for t, p in zip(no_ties, picks, strict=True)) >= 5
    assert any("baseline" not in lim for _, _, lim in cases[len(cs.DEPLOY_CASES):])
    # every quality loss of a random case is exact (a multiple of 1/64)
    for _, options, limits in cases[len(cs.DEPLOY_CASES):]:
        base = next(o for o in options if o["name"] == limits.get("baseline", "fp32"))
        for o in options:
            loss = o["perplexity"] / base["perplexity"] - 1
            assert loss * 64 == round(loss * 64) and loss == \
                (o["perplexity"] - base["perplexity"]) / base["perplexity"]


def test_choose_deployment_hidden_cases_depend_on_the_seed(capsys) -> None:
    test_hidden_cases_depend_on_the_seed(check_choose_deployment, (choose_deployment,), capsys)
    # and the hidden baseline's name is used, not only "fp32"
    baselines = {kwargs.get("baseline", "fp32") for seed in HIDDEN_SEEDS for kwargs in
                 inputs_seen(check_choose_deployment, [choose_deployment], seed,
                             summary=lambda candidates, **kwargs: kwargs)}
    assert baselines - {"fp32", "fp16"}


def test_hidden_deployment_values_come_from_the_seed(monkeypatch) -> None:
    """Not only the sizes: with every ctx.pick held at its visible value, the hidden random
    menus still differ from the visible ones (their values come from the mixed seed)."""
    visible = cs.deployment_cases(Context())
    monkeypatch.setattr(Context, "pick", lambda self, shown, *hidden, seed=0: shown)
    n_fixed = len(cs.DEPLOY_CASES)
    for seed in HIDDEN_SEEDS:
        hidden = cs.deployment_cases(Context(seed))
        assert hidden[:n_fixed] == visible[:n_fixed]
        same = sum(a == b for a, b in zip(visible[n_fixed:], hidden[n_fixed:], strict=True))
        assert same < 0.1 * (len(visible) - n_fixed), seed
