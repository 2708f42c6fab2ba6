"""Checks for the exercises of chapter 8 (deployment and cost) and of the capstone, chapter 9.

The references are plain Python written here, not calls into ``course_lib.serving`` or
``course_lib.cost``, so a check keeps meaning the same thing while the library changes; the
tests compare them with the library (and the request validator with the running server):

* **latency metrics** (:func:`reference_request_latency`, :func:`reference_goodput`): as
  :func:`course_lib.serving.loadgen.latency_metrics` and the goodput of
  :func:`~course_lib.serving.loadgen.summarize` (vLLM's benchmark definitions);
* **cost** (:func:`reference_cost_per_million_tokens`): as
  :func:`course_lib.cost.cost_per_million_tokens`;
* **request validation** (:func:`reference_validate_completion`): the status code and the
  ``param`` of the error the course's server answers to a ``/v1/completions`` body.

The capstone's **deployment choice** (:func:`check_choose_deployment`) is graded against
:func:`course_lib.cost.choose_deployment` itself: that function *is* the course's decision rule
(notebook 09 uses it to build its decision table), so the check cannot drift from it. Its random
cases are drawn so that every comparison is exact: perplexities are a power of two times
(64 + j) / 64, so any sound way of computing the quality loss gives the same float, and limits
are often set exactly at a candidate's value to test that they are inclusive.

Hidden cases (``hidden_seed``) keep the hand-written cases and draw every random one from the
instructor's seed, with other sizes and ranges too: more or fewer token times and requests,
other prices and throughputs, and for the validator another context length, model name and
prompt text, and a wider choice of field values.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

from course_lib.cost import choose_deployment as library_choose_deployment
from course_lib.grading.core import Context, check

POINTS = {"latency_metrics": 2, "cost": 1, "request_validator": 2, "choose_deployment": 2}

RANDOM_CASES = 200


def _close(a, b, rel: float = 1e-9) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# --- 1. latency metrics and goodput -----------------------------------------------------------


def reference_request_latency(start: float, token_times: Sequence[float], end: float,
                              output_tokens: int | None = None) -> dict:
    """``{"ttft", "itl", "e2e", "tpot"}`` of one streamed request (seconds).

    TTFT = first token - start; ITL = gaps between consecutive token times; E2E = end - start;
    TPOT = (E2E - TTFT) / (n - 1), n = ``output_tokens`` when given (a chunk may carry several
    tokens) else the number of token times; None when n <= 1.
    """
    ttft, e2e = token_times[0] - start, end - start
    n = output_tokens or len(token_times)
    itl = [b - a for a, b in zip(token_times[:-1], token_times[1:], strict=True)]
    return {"ttft": ttft, "itl": itl, "e2e": e2e, "tpot": (e2e - ttft) / (n - 1) if n > 1 else None}


def reference_goodput(requests: Sequence[dict], slos: dict[str, float], duration: float) -> float:
    """Requests per second that succeeded, got a token, and met every SLO (``<=``, seconds).

    ``requests``: dicts with ``success``, ``ttft``, ``tpot``, ``e2e`` (as the load generator's
    ``result["requests"]``); a request without a TPOT (one token) meets a TPOT SLO.
    """
    good = 0
    for r in requests:
        if not r["success"] or r["ttft"] is None:
            continue
        if all((key == "tpot" and r["tpot"] is None) or r[key] <= limit
               for key, limit in slos.items()):
            good += 1
    return good / duration


#: (what the case is about, start, token_times, end, output_tokens)
LATENCY_CASES = [
    ("worked example: 4 tokens, one per chunk", 10.0, [10.5, 10.6, 10.7, 10.8], 10.85, None),
    ("a single token: no decode phase, TPOT is None", 0.0, [0.25], 0.3, None),
    ("chunks carrying several tokens: n is output_tokens, not the number of chunks",
     1.0, [1.5, 2.0, 2.5], 2.5, 9),
    ("the last byte comes after the last token: E2E ends at `end`", 0.0, [0.2, 0.4], 1.0, None),
    ("uneven gaps", 5.0, [5.1, 5.15, 5.6, 5.61, 5.9], 5.9, None),
]

#: (what the case is about, requests, slos, duration)
_REQ = {"success": True, "ttft": 0.1, "tpot": 0.02, "e2e": 1.0}
GOODPUT_CASES = [
    ("all requests meet the SLOs: goodput = requests / duration",
     [_REQ] * 4, {"ttft": 0.5, "tpot": 0.05}, 2.0),
    ("a failed request never counts", [_REQ, {**_REQ, "success": False}], {"ttft": 0.5}, 1.0),
    ("one SLO missed is enough to not count", [_REQ, {**_REQ, "ttft": 0.9}, {**_REQ, "tpot": 0.2}],
     {"ttft": 0.5, "tpot": 0.05}, 1.0),
    ("an SLO is met at exactly its limit (<=)", [{**_REQ, "ttft": 0.5}], {"ttft": 0.5}, 1.0),
    ("a single-token request (tpot None) meets a TPOT SLO", [{**_REQ, "tpot": None}],
     {"tpot": 0.01}, 1.0),
    ("an E2E SLO", [_REQ, {**_REQ, "e2e": 3.0}], {"e2e": 2.0}, 4.0),
    ("no SLO keys: every successful request counts", [_REQ, _REQ, {**_REQ, "success": False}],
     {}, 0.5),
    ("a successful request without any token (ttft None) does not count",
     [{"success": True, "ttft": None, "tpot": None, "e2e": 0.1}, _REQ], {"e2e": 5.0}, 1.0),
]


def random_latency_case(rng: random.Random, max_times: int = 12) -> tuple:
    start = rng.uniform(0, 100)
    times, t = [], start
    for _ in range(rng.randint(1, max_times)):
        t += rng.expovariate(10)
        times.append(t)
    end = t + rng.choice([0.0, rng.uniform(0, 0.1)])
    output_tokens = rng.choice([None, len(times), len(times) + rng.randint(0, 20)])
    return start, times, end, output_tokens


def random_goodput_case(rng: random.Random, max_requests: int = 20) -> tuple:
    requests = []
    for _ in range(rng.randint(0, max_requests)):
        if rng.random() < 0.15:
            requests.append({"success": False, "ttft": None, "tpot": None, "e2e": rng.random()})
            continue
        ttft = rng.uniform(0.01, 1.0)
        tpot = None if rng.random() < 0.1 else rng.uniform(0.005, 0.1)
        requests.append({"success": True, "ttft": ttft, "tpot": tpot,
                         "e2e": ttft + rng.uniform(0, 3)})
    keys = rng.sample(["ttft", "tpot", "e2e"], rng.randint(1, 3))
    limits = {"ttft": rng.uniform(0.1, 0.8), "tpot": rng.uniform(0.01, 0.08),
              "e2e": rng.uniform(0.5, 3)}
    return requests, {k: limits[k] for k in keys}, rng.uniform(0.5, 30)


def _hint_latency(got: dict, want: dict, start, times, end) -> str:
    tpot, e2e, ttft = got.get("tpot"), want["e2e"], want["ttft"]
    if want["tpot"] is None or tpot is None:
        return ""
    if len(times) > 1 and _close(tpot, (e2e - ttft) / (len(times) - 1)):
        return " (n is output_tokens when it is given: a chunk may carry several tokens)"
    n = round((e2e - ttft) / want["tpot"]) + 1
    if _close(tpot, e2e / n) or _close(tpot, e2e / (n - 1)) or _close(tpot, (e2e - ttft) / n):
        return " (TPOT leaves out the first token: (E2E - TTFT) / (n - 1))"
    return ""


def _compare_latency(ctx: Context, fn, start, times, end, output_tokens) -> None:
    want = reference_request_latency(start, times, end, output_tokens)
    given = list(times)
    got = fn(start, given, end, output_tokens)
    if given != list(times):
        ctx.fail("your function changed the token_times list it was given")
    if not isinstance(got, dict):
        ctx.fail(f"expected a dict with keys ttft, itl, e2e, tpot; got {type(got).__name__}")
    missing = [k for k in want if k not in got]
    if missing:
        ctx.fail(f"the dict has no {', '.join(missing)} (expected keys ttft, itl, e2e, tpot)")
    for key in ("ttft", "e2e"):
        if not _close(got[key], want[key]):
            ctx.fail(f"{key}: expected {want[key]:.6g}, got {got[key]!r}")
    itl = got["itl"]
    if not isinstance(itl, (list, tuple)) or len(itl) != len(want["itl"]) or not all(
            _close(a, b) for a, b in zip(itl, want["itl"], strict=False)):
        extra = " (ITLs are the gaps between token times: n - 1 of them, nothing from start)" \
            if isinstance(itl, (list, tuple)) and len(itl) != len(want["itl"]) else ""
        ctx.fail(f"itl: expected {[round(x, 6) for x in want['itl']]}, got {itl!r}{extra}")
    if want["tpot"] is None:
        if got["tpot"] is not None:
            ctx.fail(f"tpot: expected None (one token has no decode phase), got {got['tpot']!r}")
    elif not _close(got["tpot"], want["tpot"]):
        ctx.fail(f"tpot: expected {want['tpot']:.6g}, got {got['tpot']!r}"
                 f"{_hint_latency(got, want, start, times, end)}")


def _hint_goodput(got, requests, slos, duration) -> str:
    n_ok = sum(1 for r in requests if r["success"] and r["ttft"] is not None)
    good = reference_goodput(requests, slos, duration) * duration
    if n_ok and _close(got, good / n_ok if n_ok else 0):
        return " (goodput is requests per SECOND meeting the SLOs, not a fraction)"
    if _close(got, sum(1 for r in requests if r["ttft"] is not None and r["success"]) / duration):
        return " (a request counts only if it meets EVERY SLO)"
    return ""


def _compare_goodput(ctx: Context, fn, requests, slos, duration) -> None:
    want = reference_goodput(requests, slos, duration)
    got = fn([dict(r) for r in requests], dict(slos), duration)
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        ctx.fail(f"goodput should be a number (requests per second), got {type(got).__name__}")
    if not _close(float(got), want):
        ctx.fail(f"goodput: expected {want:.6g} requests/s, got {got!r}"
                 f"{_hint_goodput(got, requests, slos, duration)}")


@check("latency metrics and goodput", POINTS["latency_metrics"])
def check_latency_metrics(ctx: Context, request_latency, goodput) -> None:
    """``request_latency(start, token_times, end, output_tokens=None)`` -> dict as
    :func:`reference_request_latency`; ``goodput(requests, slos, duration)`` -> requests/s as
    :func:`reference_goodput`. Fixed cases, then seeded random ones."""
    for label, start, times, end, n in LATENCY_CASES:
        ctx.case = f"request_latency, {label} (start={start}, token_times={times}, end={end}, " \
                   f"output_tokens={n})"
        _compare_latency(ctx, request_latency, start, times, end, n)
    rng = ctx.rng(801)
    max_times = ctx.pick(12, 6, 9, 16, 24, seed=811)
    max_requests = ctx.pick(20, 10, 15, 30, seed=812)
    for i in range(RANDOM_CASES):
        start, times, end, n = random_latency_case(rng, max_times)
        ctx.case = f"request_latency, random case {i} (start={start:.4f}, {len(times)} token " \
                   f"times, end={end:.4f}, output_tokens={n})"
        _compare_latency(ctx, request_latency, start, times, end, n)
    for label, requests, slos, duration in GOODPUT_CASES:
        ctx.case = f"goodput, {label} (slos={slos}, duration={duration}, {len(requests)} requests)"
        _compare_goodput(ctx, goodput, requests, slos, duration)
    for i in range(RANDOM_CASES):
        requests, slos, duration = random_goodput_case(rng, max_requests)
        ctx.case = f"goodput, random case {i} ({len(requests)} requests, slos={slos})"
        _compare_goodput(ctx, goodput, requests, slos, duration)


# --- 2. dollars per million tokens ------------------------------------------------------------


def reference_cost_per_million_tokens(gpu_hourly_usd: float, tokens_per_second: float,
                                      utilization: float = 1.0) -> float:
    """USD per 1M tokens: hourly price / tokens per hour * 1e6, divided by utilization.

    ValueError unless tokens_per_second > 0, 0 < utilization <= 1 and gpu_hourly_usd >= 0.
    """
    if not tokens_per_second > 0:
        raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if not gpu_hourly_usd >= 0:
        raise ValueError(f"gpu_hourly_usd must be >= 0, got {gpu_hourly_usd}")
    return gpu_hourly_usd / (tokens_per_second * 3600) * 1e6 / utilization


#: (what the case is about, hourly, tokens/s, utilization or None for the default)
COST_CASES = [
    ("worked example: $2.50/h at 50 tokens/s", 2.50, 50.0, None),
    ("twice the throughput, half the cost", 2.50, 100.0, None),
    ("half utilization: the idle hours are paid too, so the cost doubles", 2.50, 50.0, 0.5),
    ("a fast GPU", 7.0, 2500.0, 0.8),
    ("a free machine costs nothing", 0.0, 10.0, 1.0),
    ("a CPU VM", 0.10, 35.0, 0.25),
]

#: (what the case is about, arguments) that must raise ValueError
COST_ERRORS = [
    ("0 tokens/s (nothing is produced: no finite price)", (2.5, 0.0, 1.0)),
    ("negative tokens/s", (2.5, -5.0, 1.0)),
    ("utilization 0", (2.5, 50.0, 0.0)),
    ("utilization above 1", (2.5, 50.0, 1.5)),
]


def cost_cases(ctx: Context) -> list[tuple[str, float, float, float | None]]:
    """:data:`COST_CASES`, then random ones: (label, hourly, tokens/s, utilization or None).
    ``cost_cases(Context())`` lists the visible cases; hidden ones draw their values, ranges and
    count from the instructor's seed."""
    rng = ctx.rng(802)
    hourly_max = ctx.pick(10, 4, 20, 40, seed=804)
    tps_max = ctx.pick(5000, 2000, 10000, 20000, seed=805)
    return list(COST_CASES) + [(f"random case {i}", round(rng.uniform(0.1, hourly_max), 2),
                                rng.uniform(1, tps_max), rng.choice([None, rng.uniform(0.05, 1)]))
                               for i in range(ctx.pick(50, 40, 45, 55, 60, seed=806))]


def _hint_cost(got: float, hourly: float, tps: float, util: float) -> str:
    base = hourly / (tps * 3600) * 1e6
    if _close(got, base * util):
        return " (utilization DIVIDES: idle time is paid but produces nothing)"
    if _close(got, base * 3600 / util) or _close(got, base / 3600 / util) or _close(got, base * 60 / util):
        return " (tokens per HOUR = tokens_per_second * 3600)"
    if _close(got, base / 1000 / util) or _close(got, base / 1e6 / util):
        return " (the price is per MILLION tokens)"
    return ""


@check("dollars per million tokens", POINTS["cost"])
def check_cost(ctx: Context, fn) -> None:
    """``fn(gpu_hourly_usd, tokens_per_second, utilization=1.0)`` as
    :func:`reference_cost_per_million_tokens`, and ValueError on impossible inputs."""
    for label, hourly, tps, util in cost_cases(ctx):
        args = (hourly, tps) if util is None else (hourly, tps, util)
        ctx.case = f"{label} (gpu_hourly_usd={hourly}, tokens_per_second={tps:g}" + \
                   ("" if util is None else f", utilization={util:g}") + ")"
        want = reference_cost_per_million_tokens(*args)
        got = fn(*args)
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            ctx.fail(f"expected a number of dollars, got {type(got).__name__}")
        if not _close(float(got), want, rel=1e-6):
            ctx.fail(f"expected ${want:.4f} per 1M tokens, got {got!r}"
                     f"{_hint_cost(float(got), hourly, tps, 1.0 if util is None else util)}")
    for label, args in COST_ERRORS:
        ctx.case = f"{label}: fn{args}"
        try:
            got = fn(*args)
        except ValueError:
            continue
        except ZeroDivisionError:
            ctx.fail("raised ZeroDivisionError; check the input and raise ValueError with a "
                     "message naming the argument instead")
        ctx.fail(f"should raise ValueError, returned {got!r}")


# --- 3. request validation --------------------------------------------------------------------

#: The server's limits (course_lib.serving.protocol): choices per request, stop strings.
MAX_N, MAX_STOP = 16, 4
#: max_tokens when the body does not have the key (OpenAI's default for completions).
DEFAULT_MAX_TOKENS = 16

_STATUS_TYPE = {400: "invalid_request_error", 404: "not_found_error"}


def _error(status: int, param: str, message: str, code: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": _STATUS_TYPE[status], "param": param,
                              "code": code}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def reference_validate_completion(body: dict, model_name: str, context_len: int,
                                  count_tokens: Callable[[str], int]) -> tuple[int, dict] | None:
    """None if the server accepts ``body`` (a ``/v1/completions`` request), else
    ``(status, {"error": {"message", "type", "param", "code"}})``, the first problem found in
    the server's order: the schema first (FastAPI validates the body before the handler runs,
    field by field: temperature, top_p, n, prompt, max_tokens), then the handler's checks
    (model, empty prompt, stop, max_tokens >= 1, context length).
    """
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        return _error(400, "temperature", f"temperature must be in [0, 2], got {temperature!r}")
    top_p = body.get("top_p")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        return _error(400, "top_p", f"top_p must be in (0, 1], got {top_p!r}")
    if "n" in body and not (_is_int(body["n"]) and 1 <= body["n"] <= MAX_N):
        return _error(400, "n", f"n must be an integer from 1 to {MAX_N}, got {body['n']!r}")
    if "prompt" not in body:
        return _error(400, "prompt", "prompt: field required")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is not None and not _is_int(max_tokens):
        return _error(400, "max_tokens", f"max_tokens must be an integer, got {max_tokens!r}")
    model = body.get("model")
    if model is not None and model != model_name:
        return _error(404, "model", f"the model {model!r} does not exist; this server serves "
                                    f"{model_name!r}", "model_not_found")
    prompt = body["prompt"]
    n_prompt = count_tokens(prompt)
    if n_prompt == 0:
        return _error(400, "prompt", "prompt must contain at least one token")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        return _error(400, "stop", f"stop accepts at most {MAX_STOP} strings, got {len(stops)}")
    if max_tokens is None:  # explicit null: whatever the context leaves (at least 1)
        max_tokens = max(1, context_len - n_prompt)
    if max_tokens < 1:
        return _error(400, "max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
    if n_prompt + max_tokens > context_len:
        param = "prompt" if n_prompt >= context_len else "max_tokens"
        return _error(400, param, f"this model's context is {context_len} tokens; the prompt "
                                  f"({n_prompt} tokens) + max_tokens ({max_tokens}) is "
                                  f"{n_prompt + max_tokens}", "context_length_exceeded")
    return None


def char_tokens(text: str) -> int:
    """The checks' toy token counter: one token per 4 characters (rounded up)."""
    return -(-len(text) // 4)


def request_cases(context: int, prompt_of: Callable[[int], str], model: str) -> list[tuple[str, dict]]:
    """(what it is about, body) for a server with ``context`` tokens; ``prompt_of(n)`` is a
    prompt of exactly ``n`` tokens."""
    p = prompt_of(8)
    return [
        ("a minimal valid request", {"prompt": p}),
        ("a full valid request", {"model": model, "prompt": p, "max_tokens": 5, "temperature": 0.7,
                                  "top_p": 0.9, "n": 2, "stop": ["\n", "#"]}),
        ("temperature 0 and 2 are allowed (greedy, and the top of the range)",
         {"prompt": p, "temperature": 2, "top_p": 1, "n": 16}),
        ("null fields mean 'default'", {"model": None, "prompt": p, "temperature": None,
                                        "top_p": None, "stop": None}),
        ("an unknown model: 404", {"model": "gpt-4", "prompt": p}),
        ("no prompt", {"max_tokens": 4}),
        ("an empty prompt", {"prompt": ""}),
        ("max_tokens 0", {"prompt": p, "max_tokens": 0}),
        ("max_tokens negative", {"prompt": p, "max_tokens": -3}),
        ("max_tokens a float", {"prompt": p, "max_tokens": 4.0}),
        ("max_tokens a bool (True is not an integer here)", {"prompt": p, "max_tokens": True}),
        ("max_tokens a string", {"prompt": p, "max_tokens": "10"}),
        ("temperature above 2", {"prompt": p, "temperature": 2.5}),
        ("temperature negative", {"prompt": p, "temperature": -0.1}),
        ("top_p 0 (the range is (0, 1])", {"prompt": p, "top_p": 0}),
        ("top_p above 1", {"prompt": p, "top_p": 1.2}),
        ("n 0", {"prompt": p, "n": 0}),
        ("n above 16", {"prompt": p, "n": 17}),
        ("n a bool", {"prompt": p, "n": True}),
        ("five stop strings", {"prompt": p, "stop": ["a", "b", "c", "d", "e"]}),
        ("one stop string as a plain str", {"prompt": p, "stop": "\n\n"}),
        ("prompt + max_tokens exactly fill the context",
         {"prompt": prompt_of(context - 10), "max_tokens": 10}),
        ("prompt + max_tokens one over the context: max_tokens is at fault",
         {"prompt": prompt_of(context - 10), "max_tokens": 11}),
        ("the prompt alone fills the context: the prompt is at fault",
         {"prompt": prompt_of(context), "max_tokens": 1}),
        ("no max_tokens key: the default 16 counts against the context",
         {"prompt": prompt_of(context - 8)}),
        ("max_tokens null: whatever the context leaves", {"prompt": prompt_of(context - 8),
                                                          "max_tokens": None}),
        ("max_tokens null and the prompt fills the context", {"prompt": prompt_of(context),
                                                              "max_tokens": None}),
        ("two problems: a schema error (temperature) comes before the unknown model",
         {"model": "nope", "prompt": p, "temperature": 9}),
        ("two problems: temperature is checked before n", {"prompt": p, "temperature": 3, "n": 0}),
        ("two problems: the unknown model comes before the empty prompt",
         {"model": "nope", "prompt": ""}),
        ("two problems: max_tokens 0 and the context (max_tokens 0 first)",
         {"prompt": prompt_of(context + 5), "max_tokens": 0}),
        ("two problems: too many stop strings before the context",
         {"prompt": prompt_of(context), "stop": list("abcde")}),
        ("two problems: a float max_tokens (schema) before the unknown model",
         {"model": "nope", "prompt": p, "max_tokens": 2.5}),
    ]


def random_request(rng: random.Random, context: int, prompt_of: Callable[[int], str],
                   model: str, wide: bool = False) -> dict:
    """A body with each field valid, invalid or absent at random (often two problems).

    ``wide`` (the hidden cases) adds values of each field the visible cases never send, and
    sometimes a field the server ignores; without it the draws are exactly the visible ones."""
    def more(*values) -> list:  # arguments that draw from rng must not be passed here
        return list(values) if wide else []

    body: dict = {}
    pick = rng.random
    if pick() < 0.5:
        body["model"] = rng.choice([model, model, "other-model", None, *more(model + "-v2")])
    if pick() < 0.92:
        body["prompt"] = rng.choice(["", prompt_of(rng.randint(1, 12)),
                                     prompt_of(rng.randint(context - 20, context + 3)),
                                     *([prompt_of(rng.randint(13, context - 21))] if wide else [])])
    if pick() < 0.7:
        body["max_tokens"] = rng.choice([None, 0, -1, 1, 2, 8, 16, 24, 1.5, True, "3",
                                         rng.randint(1, context),
                                         *more(3, 5, 32, -7, 2.0, False),
                                         *([rng.randint(1, 30)] if wide else [])])
    if pick() < 0.4:
        body["temperature"] = rng.choice([0, 0.5, 1, 2, 2.01, -1, None,
                                          *more(0.01, 1.5, 1.99, 3, -0.5, "0.5")])
    if pick() < 0.3:
        body["top_p"] = rng.choice([0, 0.1, 1, 1.01, None, *more(0.5, 0.999, 1.5, -0.1)])
    if pick() < 0.3:
        body["n"] = rng.choice([0, 1, 3, 16, 17, True, *more(2, 8, 15, -1, 2.0)])
    if pick() < 0.3:
        body["stop"] = rng.choice([None, "\n", [], ["a"], list("abcd"), list("abcde"),
                                   *more("###", ["x", "y"], list("abc"), list("abcdef"))])
    if wide and pick() < 0.15:
        body["user"] = "learner-" + str(rng.randint(1, 99))  # the server ignores unknown fields
    return body


def _normalise_answer(ctx: Context, got):
    if got is None:
        return None
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        ctx.fail(f"expected None or a (status, body) pair, got {got!r}"[:300])
    status, body = got
    if isinstance(status, bool) or not isinstance(status, int):
        ctx.fail(f"the status must be an int (400, 404), got {status!r}")
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        ctx.fail(f"the body must be {{'error': {{'message', 'type', 'param', 'code'}}}} (the "
                 f"OpenAI error shape), got {body!r}"[:300])
    if not isinstance(error["message"], str) or not error["message"]:
        ctx.fail("error['message'] must say what is wrong (a non-empty string)")
    return status, error


def _describe_answer(answer) -> str:
    if answer is None:
        return "None (valid)"
    status, error = answer
    return f"{status} with param {error['param']!r}"


def _compare_validation(ctx: Context, fn, body: dict, model: str, context: int, count) -> None:
    want = reference_validate_completion(body, model, context, count)
    given = {k: (list(v) if isinstance(v, list) else v) for k, v in body.items()}
    got = _normalise_answer(ctx, fn(given, model, context, count))
    if given != body:
        ctx.fail("your function changed the request body it was given")
    if want is None or got is None:
        if (want is None) != (got is None):
            ctx.fail(f"expected {_describe_answer(want and (want[0], want[1]['error']))}, got "
                     f"{_describe_answer(got)}")
        return
    status, error = got
    w_status, w_error = want[0], want[1]["error"]
    if (status, error["param"]) != (w_status, w_error["param"]):
        ctx.fail(f"expected {w_status} with param {w_error['param']!r}, got {status} with param "
                 f"{error['param']!r} (the server reports the first problem, in its order)")
    if error["type"] != w_error["type"]:
        ctx.fail(f"error['type'] should be {w_error['type']!r} for a {w_status}, got "
                 f"{error['type']!r}")


@check("request validator", POINTS["request_validator"])
def check_request_validator(ctx: Context, fn) -> None:
    """``fn(body, model_name, context_len, count_tokens)`` -> None or (status, error body), the
    status, ``param`` and ``type`` as :func:`reference_validate_completion`."""
    model = ctx.pick("tiny", "tiny-gpt", "course-lm", "gpt2-small", "tiny-chat", seed=813)
    context = ctx.pick(64, 40, 48, 56, 72, 80, 96, 128, seed=814)
    word = ctx.pick("abcd", "wxyz", "the ", "tok ", "0123", "ab c", seed=815)  # 4 chars: 1 token

    def prompt_of(n: int) -> str:
        return word * n

    for label, body in request_cases(context, prompt_of, model):
        ctx.case = f"{label} (body with {_body_summary(body)}; context {context} tokens)"
        _compare_validation(ctx, fn, body, model, context, char_tokens)
    rng = ctx.rng(803)
    for i in range(RANDOM_CASES):
        body = random_request(rng, context, prompt_of, model, wide=ctx.hidden)
        ctx.case = f"random body {i} ({_body_summary(body)}; context {context} tokens)"
        _compare_validation(ctx, fn, body, model, context, char_tokens)


def _body_summary(body: dict) -> str:
    parts = []
    for key, value in body.items():
        if key == "prompt" and isinstance(value, str):
            parts.append(f"prompt of {char_tokens(value)} tokens")
        else:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts) or "no fields"


# --- 4. choosing a deployment (chapter 9) -----------------------------------------------------

#: The three requirements, in the order messages list them.
LIMITS = ("max_weight_gb", "max_quality_loss", "min_tokens_per_s")


def _option(name: str, weight_gb: float, perplexity: float, tokens_per_s: float,
            usd_per_million: float) -> dict:
    return {"name": name, "weight_gb": weight_gb, "perplexity": perplexity,
            "tokens_per_s": tokens_per_s, "usd_per_million": usd_per_million}


#: Four builds of one model; perplexities over the baseline 8.0 are multiples of 1/8, so the
#: quality losses are exact: int8 1/64, int4 1/8, int3 1/4.
MENU = [_option("fp32", 4.0, 8.0, 20.0, 10.0), _option("int8", 1.0, 8.125, 30.0, 6.0),
        _option("int4", 0.5, 9.0, 40.0, 5.0), _option("int3", 0.5, 10.0, 40.0, 4.0)]
_TIES = [_option("fp32", 4.0, 8.0, 10.0, 9.0), _option("w8", 2.0, 8.0, 10.0, 3.0),
         _option("awq", 2.0, 8.0, 10.0, 3.0), _option("gptq", 1.0, 8.0, 10.0, 3.0),
         _option("w3", 0.5, 8.0, 10.0, 3.5)]
_INF = math.inf


def _limits(max_weight_gb: float = _INF, max_quality_loss: float = _INF,
            min_tokens_per_s: float = 0.0, **baseline: str) -> dict:
    return {"max_weight_gb": max_weight_gb, "max_quality_loss": max_quality_loss,
            "min_tokens_per_s": min_tokens_per_s, **baseline}


#: (what the case is about, candidates, keyword arguments)
DEPLOY_CASES = [
    ("worked example: at most 2 GB and 5% worse", MENU, _limits(2.0, 0.05)),
    ("no limits: the cheapest of all", MENU, _limits()),
    ("quality first: within 1% of the baseline", MENU, _limits(max_quality_loss=0.01)),
    ("the baseline itself loses nothing, so a 0 quality budget keeps it", MENU,
     _limits(max_quality_loss=0.0)),
    ("a quality loss exactly at the limit qualifies (<=)", MENU, _limits(max_quality_loss=0.125)),
    ("a weight exactly at the limit qualifies (<=)", MENU, _limits(1.0, 0.1)),
    ("tokens/s exactly at the minimum qualifies (>=)", MENU, _limits(max_quality_loss=0.1,
                                                                     min_tokens_per_s=30.0)),
    ("fast and small but loose on quality", MENU, _limits(0.75, 0.3, 35.0)),
    ("nothing qualifies: None", MENU, _limits(0.75, 0.1)),
    ("nothing is fast enough: None", MENU, _limits(min_tokens_per_s=41.0)),
    ("a price tie goes to the smaller weight_gb", _TIES, _limits()),
    ("a price and weight tie goes to the name, alphabetically", _TIES[:3], _limits()),
    ("the order of the list does not matter", [_TIES[1], _TIES[0],
                                               _option("gptq", 2.0, 8.0, 10.0, 3.0), _TIES[2]],
     _limits()),
    ("the baseline is too heavy but still measures quality", MENU[::-1], _limits(0.6, 0.2)),
    ("better than the baseline: a negative loss meets any quality limit",
     [_option("fp32", 4.0, 8.0, 10.0, 9.0), _option("gptq", 1.0, 7.5, 10.0, 5.0)],
     _limits(max_quality_loss=0.0)),
    ("another baseline, by name", [_option("bf16", 2.0, 16.0, 12.0, 7.0),
                                   _option("int8", 1.0, 16.5, 14.0, 6.0),
                                   _option("int4", 0.5, 18.0, 16.0, 4.0)],
     _limits(max_quality_loss=0.05, baseline="bf16")),
    ("a candidate that produced nothing costs inf and never wins a price",
     [_option("fp32", 4.0, 8.0, 10.0, 9.0), _option("broken", 0.5, 8.0, 0.0, _INF)],
     _limits()),
]

#: (what the case is about, candidates, keyword arguments) that must raise ValueError
DEPLOY_ERRORS = [
    ("no candidate is named baseline='fp32'", MENU[1:], _limits(2.0, 0.05)),
    ("no candidate is named baseline='fp16'", MENU, _limits(2.0, 0.05, baseline="fp16")),
]

_NAMES = ("int8", "int4", "w4a16", "gptq-w4", "awq-w4", "w8a8", "int3", "nf4", "fp8", "gptq-w3")


def random_deployment_case(rng: random.Random, max_options: int = 6, baseline: str = "fp32",
                           base_perplexities: Sequence[float] = (8.0, 16.0, 32.0),
                           weights: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
                           prices: Sequence[float] = (1.0, 2.0, 3.0, 5.0, 8.0)) -> tuple:
    """(candidates, keyword arguments) with exact figures, frequent ties and limits often set
    exactly at a candidate's value."""
    base = rng.choice(base_perplexities)
    names = [baseline, *rng.sample(_NAMES, rng.randint(0, min(max_options, len(_NAMES)) - 1))]
    rng.shuffle(names)
    options, losses = [], []
    for name in names:
        j = 0 if name == baseline else rng.randint(-3, 24)
        losses.append(j / 64)
        tps = rng.choice([0.0, 5.0, 10.0, 20.0, round(rng.uniform(1, 50), 3)]) \
            if rng.random() < 0.9 else 0.0
        price = _INF if tps == 0 else rng.choice([*prices, round(rng.uniform(0.5, 10), 2)])
        options.append(_option(name, rng.choice(weights), base * (64 + j) / 64, tps, price))

    def at_a_value(values, *others):
        return rng.choice([*values, *others])

    limits = _limits(
        at_a_value([o["weight_gb"] for o in options], _INF, round(rng.uniform(0.2, 5), 3)),
        at_a_value([v for v in losses if v >= 0], _INF, 0.0, rng.randint(0, 30) / 64),
        at_a_value([o["tokens_per_s"] for o in options], 0.0, round(rng.uniform(0, 40), 3)))
    if baseline != "fp32" or rng.random() < 0.5:
        limits["baseline"] = baseline
    return options, limits


def deployment_cases(ctx: Context) -> list[tuple[str, list[dict], dict]]:
    """:data:`DEPLOY_CASES`, then random ones; hidden ones draw their sizes, baseline name,
    figures and count from the instructor's seed."""
    rng = ctx.rng(901)
    max_options = ctx.pick(6, 3, 5, 8, 11, seed=902)
    baseline = ctx.pick("fp32", "fp16", "bf16", "fp32", "base", seed=903)
    bases = ctx.pick((8.0, 16.0, 32.0), (4.0, 64.0), (2.0, 8.0, 128.0), seed=904)
    weights = ctx.pick((0.25, 0.5, 1.0, 2.0, 4.0), (0.125, 0.75, 1.5, 3.0), (0.5, 1.0, 6.0, 14.0),
                       seed=905)
    prices = ctx.pick((1.0, 2.0, 3.0, 5.0, 8.0), (0.5, 1.25, 4.0), (2.0, 2.5, 6.0, 9.0, 20.0),
                      seed=906)
    count = ctx.pick(150, 120, 160, 200, seed=907)
    return list(DEPLOY_CASES) + [
        (f"random case {i}", *random_deployment_case(rng, max_options, baseline, bases, weights,
                                                     prices))
        for i in range(count)]


def _describe_options(options: Sequence[dict]) -> str:
    return "; ".join(f"{o['name']} {o['weight_gb']:g} GB ppl {o['perplexity']:g} "
                     f"{o['tokens_per_s']:g} tok/s ${o['usd_per_million']:g}" for o in options)


def _alternative(options: Sequence[dict], limits: dict, *, strict: bool = False,
                 quality: bool = True, tie_break: bool = True) -> str | None:
    """The name a typical wrong rule picks (to say which mistake a wrong answer makes)."""
    base = next(o["perplexity"] for o in options if o["name"] == limits.get("baseline", "fp32"))

    def within(value, limit, smaller):
        if strict:
            return value < limit if smaller else value > limit
        return value <= limit if smaller else value >= limit

    ok = [o for o in options
          if within(o["weight_gb"], limits["max_weight_gb"], True)
          and (not quality or within(o["perplexity"] / base - 1, limits["max_quality_loss"], True))
          and within(o["tokens_per_s"], limits["min_tokens_per_s"], False)]
    if not ok:
        return None
    key = (lambda o: (o["usd_per_million"], o["weight_gb"], o["name"])) if tie_break else \
        (lambda o: o["usd_per_million"])
    return min(ok, key=key)["name"]


def _hint_deployment(got: str | None, want: str | None, options, limits) -> str:
    hints = [(dict(strict=True), " (the limits are inclusive: a candidate exactly at a limit "
                                 "qualifies)"),
             (dict(quality=False), " (a candidate must also keep its quality loss, perplexity / "
                                   "the baseline's perplexity - 1, within max_quality_loss)"),
             (dict(tie_break=False), " (a price tie goes to the smaller weight_gb, then to the "
                                     "name in alphabetical order, whatever the list's order)")]
    for kwargs, hint in hints:
        if got != want and _alternative(options, limits, **kwargs) == got:
            return hint
    return ""


def _name_of(ctx: Context, got) -> str | None:
    if got is None:
        return None
    if isinstance(got, str):
        ctx.fail(f"return the chosen candidate (its dict), not its name {got!r}")
    if not isinstance(got, Mapping) or "name" not in got:
        ctx.fail(f"expected one of the candidates (a dict with a 'name') or None, got "
                 f"{type(got).__name__}")
    return got["name"]


def _compare_deployment(ctx: Context, fn, options: list[dict], limits: dict) -> None:
    want = library_choose_deployment(options, **limits)
    want = None if want is None else want["name"]
    given = [dict(o) for o in options]
    got = _name_of(ctx, fn(given, **limits))
    if given != options:
        ctx.fail("your function changed the candidates it was given")
    if got != want:
        what = "None (nothing qualifies)" if want is None else repr(want)
        ctx.fail(f"expected {what}, got {'None' if got is None else repr(got)}"
                 f"{_hint_deployment(got, want, options, limits)}")


def _describe_limits(limits: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}"
                     for k, v in limits.items())


@check("choose a deployment", POINTS["choose_deployment"])
def check_choose_deployment(ctx: Context, fn) -> None:
    """``fn(candidates, *, max_weight_gb, max_quality_loss, min_tokens_per_s, baseline="fp32")``
    picks the candidate :func:`course_lib.cost.choose_deployment` picks (or None), and raises
    ValueError when no candidate is named ``baseline``."""
    for label, options, limits in deployment_cases(ctx):
        detail = f"{_describe_limits(limits)}; {len(options)} candidates"
        if not label.startswith("random"):
            detail = f"{_describe_limits(limits)}; candidates: {_describe_options(options)}"
        ctx.case = f"{label} ({detail})"
        _compare_deployment(ctx, fn, options, limits)
    for label, options, limits in DEPLOY_ERRORS:
        ctx.case = f"{label} ({_describe_limits(limits)})"
        try:
            got = fn([dict(o) for o in options], **limits)
        except ValueError:
            continue
        except (KeyError, StopIteration, IndexError) as exc:
            ctx.fail(f"raised {type(exc).__name__}; raise ValueError with a message naming the "
                     f"missing baseline instead")
        ctx.fail(f"should raise ValueError (quality loss needs the baseline), returned {got!r}")
