"""Dollars per million tokens, from a measured throughput and a GPU's hourly price.

A GPU is rented by the hour whatever it does, so the cost of a token is the hourly price
divided by how many tokens the GPU turns out in that hour::

    $ per 1M tokens = hourly_usd / (tokens_per_second * 3600) * 1e6 / utilization

``utilization`` is the share of the paid hours that run at the measured throughput (a server
busy half the day pays for the idle half too, so utilization 0.5 doubles the cost). Everything
that raises throughput (quantization, batching, paged KV cache, speculative decoding) lowers
cost in the same proportion: k times the tokens per second is 1/k the dollars per token.

The chapter's ``calculate_cost`` prices *requests* from an assumed requests/s; here the inputs
are measured: :func:`cost_from_loadgen` reads the JSON the course's load generator writes.

:func:`choose_deployment` closes the loop: given measured candidates (weight size, perplexity,
tokens/s, $ per 1M tokens of e.g. FP32, INT8 and INT4 builds of one model) and a service's
requirements (memory, quality loss, speed), it picks the cheapest one that meets all of them;
:func:`decision_rows` says which requirement each of the others breaks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

#: Illustrative on-demand cloud list prices, USD per GPU-hour (one GPU, with a share of the
#: host), noted 2026-11. Prices differ by provider, region and month, and spot / reserved
#: capacity is far cheaper: edit this table (or pass ``hourly_usd=``) with your own price.
#: "cpu-2-core" is a 2-vCPU general-purpose VM, the machine this course's CPU runs use.
GPU_PRICES: dict[str, float] = {
    "cpu-2-core": 0.10,
    "T4": 0.35,
    "L4": 0.70,
    "A10G": 1.01,
    "A100-40GB": 3.67,
    "A100-80GB": 5.00,
    "H100-80GB": 7.00,
    "H200": 8.00,
}

#: Default price of an input (prompt) token relative to an output token. Prefill handles all
#: prompt tokens of a request in one compute-bound forward pass, while every output token is a
#: separate memory-bound decode step, so an input token costs the GPU a fraction of an output
#: token; API providers commonly charge input at about a quarter of output.
DEFAULT_INPUT_PRICE_RATIO = 0.25


def _number(name: str, value: Any, *, low: float, high: float = math.inf,
            low_open: bool = False, rule: str) -> float:
    """``value`` as a float, or a ValueError naming ``name`` and the allowed range ``rule``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def _check_common(hourly_usd: Any, utilization: Any,
                  hourly_name: str = "gpu_hourly_usd") -> tuple[float, float]:
    hourly = _number(hourly_name, hourly_usd, low=0.0, rule=">= 0 (USD per GPU-hour)")
    util = _number("utilization", utilization, low=0.0, high=1.0, low_open=True,
                   rule="in (0, 1] (share of paid time spent at this throughput)")
    return hourly, util


def cost_per_million_tokens(gpu_hourly_usd: float, tokens_per_second: float,
                            utilization: float = 1.0) -> float:
    """USD per 1M tokens for a GPU at ``gpu_hourly_usd`` producing ``tokens_per_second``.

    ``utilization`` (0 < u <= 1) is the share of paid time spent at that throughput; the
    idle rest is paid all the same, so the cost divides by it. $2.50/h at 50 tokens/s is
    2.50 / (50 * 3600) * 1e6 = $13.89 per 1M tokens.
    """
    hourly, util = _check_common(gpu_hourly_usd, utilization)
    tps = _number("tokens_per_second", tokens_per_second, low=0.0, low_open=True,
                  rule="> 0 (measured tokens per second)")
    return hourly / (tps * 3600.0) * 1e6 / util


def gpu_price(name: str) -> float:
    """USD per GPU-hour for ``name`` from :data:`GPU_PRICES` (exact name, case-insensitive)."""
    for known, price in GPU_PRICES.items():
        if isinstance(name, str) and known.lower() == name.lower():
            return price
    raise ValueError(f"gpu: unknown GPU {name!r}; known: {', '.join(GPU_PRICES)} "
                     "(or pass hourly_usd= with your own price)")


def split_input_output(gpu_hourly_usd: float, input_tokens_per_second: float,
                       output_tokens_per_second: float,
                       input_price_ratio: float = DEFAULT_INPUT_PRICE_RATIO,
                       utilization: float = 1.0) -> tuple[float, float]:
    """(input, output) USD per 1M tokens, splitting GPU time by a per-token cost ratio.

    Rule: an input token is charged ``input_price_ratio`` (r) times an output token, and the
    two prices are set so that the tokens of the run pay exactly for its GPU time::

        out = hourly / ((out_tps + r * in_tps) * 3600) * 1e6 / utilization
        in  = r * out

    so in_tokens * in + out_tokens * out = the GPU bill, nothing counted twice. Why: prefill
    and decode share the same GPU steps, so their time can't be measured apart; a ratio is the
    honest free parameter. r = 0 charges all the time to generated tokens (the usual "cost per
    generated token"), r = 1 prices every token alike (the blended price); the default 0.25
    follows the ratio most API providers charge, which reflects that a prompt token is
    processed in a batched, compute-bound prefill and an output token in a memory-bound decode.
    """
    hourly, util = _check_common(gpu_hourly_usd, utilization)
    in_tps = _number("input_tokens_per_second", input_tokens_per_second, low=0.0,
                     rule=">= 0 (measured input tokens per second)")
    out_tps = _number("output_tokens_per_second", output_tokens_per_second, low=0.0,
                      low_open=True, rule="> 0 (measured output tokens per second)")
    ratio = _number("input_price_ratio", input_price_ratio, low=0.0,
                    rule=">= 0 (price of an input token / price of an output token)")
    out = hourly / ((out_tps + ratio * in_tps) * 3600.0) * 1e6 / util
    return ratio * out, out


def _summary(result: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(result, (str, os.PathLike)):
        with open(result, encoding="utf-8") as f:
            result = json.load(f)
    if not isinstance(result, Mapping):
        raise ValueError(f"result must be the load generator's dict or a path to its JSON, "
                         f"got {type(result).__name__}")
    summary = result.get("summary", result)
    if not isinstance(summary, Mapping):
        raise ValueError("result['summary'] must be a dict (the load generator's summary)")
    return summary


def _field(summary: Mapping[str, Any], key: str, *, positive: bool) -> float:
    if key not in summary:
        raise ValueError(f"result['summary'] has no {key!r} (keys: {', '.join(summary)})")
    return _number(f"summary[{key!r}]", summary[key], low=0.0, low_open=positive,
                   rule="> 0" if positive else ">= 0")


def cost_from_loadgen(result: Mapping[str, Any] | str | os.PathLike, gpu: str | None = None,
                      hourly_usd: float | None = None, utilization: float = 1.0,
                      input_price_ratio: float = DEFAULT_INPUT_PRICE_RATIO) -> dict[str, Any]:
    """USD per 1M input / output / all tokens and per 1k requests, for one load-generator run.

    ``result`` is what :func:`course_lib.serving.loadgen.run_load` returns (or the path of the
    JSON file it was saved to); its ``summary`` gives ``duration`` (s), ``total_input_tokens``,
    ``total_output_tokens`` and ``request_throughput`` (requests/s). The price is ``hourly_usd``
    or :data:`GPU_PRICES`[``gpu``]. Input and output are split as in :func:`split_input_output`.

    The throughputs are those of the load that was offered: a run at a low request rate leaves
    the GPU half idle and prices that idleness in. For the cheapest price the hardware allows,
    run the load generator at saturation (all requests at once) and keep ``utilization`` for
    the real day's idle share.
    """
    if (gpu is None) == (hourly_usd is None):
        raise ValueError("give exactly one of gpu= (a name in GPU_PRICES) or hourly_usd=")
    hourly = gpu_price(gpu) if gpu is not None else hourly_usd
    hourly, util = _check_common(hourly, utilization, "hourly_usd")
    summary = _summary(result)
    duration = _field(summary, "duration", positive=True)
    in_tokens = _field(summary, "total_input_tokens", positive=False)
    out_tokens = _field(summary, "total_output_tokens", positive=True)
    req_tps = _field(summary, "request_throughput", positive=True)
    in_tps, out_tps = in_tokens / duration, out_tokens / duration
    in_price, out_price = split_input_output(hourly, in_tps, out_tps, input_price_ratio, util)
    return {
        "usd_per_1m_input_tokens": in_price,
        "usd_per_1m_output_tokens": out_price,
        "usd_per_1m_tokens": cost_per_million_tokens(hourly, in_tps + out_tps, util),
        "usd_per_1k_requests": hourly / (req_tps * 3600.0) * 1e3 / util,
        "usd_for_run": hourly * duration / 3600.0 / util,
        "inputs": {
            "gpu": gpu, "hourly_usd": hourly, "utilization": util,
            "input_price_ratio": float(input_price_ratio), "duration": duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "input_tokens_per_second": in_tps, "output_tokens_per_second": out_tps,
            "request_throughput": req_tps,
        },
    }


def quantization_effect(usd_per_1m_tokens: float, throughput_ratio: float) -> float:
    """Cost after a change that multiplies throughput by ``throughput_ratio`` (e.g. INT4 at
    1.8x tokens/s costs 1/1.8 as much): cost scales with 1 / throughput at the same GPU price.
    """
    cost = _number("usd_per_1m_tokens", usd_per_1m_tokens, low=0.0, rule=">= 0")
    ratio = _number("throughput_ratio", throughput_ratio, low=0.0, low_open=True,
                    rule="> 0 (new tokens/s divided by old tokens/s)")
    return cost / ratio


# --- choosing a deployment from measured candidates -------------------------------------------

#: The keys every candidate of :func:`choose_deployment` must have (more keys are kept as they are).
CANDIDATE_KEYS = ("name", "weight_gb", "perplexity", "tokens_per_s", "usd_per_million")

#: The constraints of :func:`decision_rows`, in the order a failed one is listed.
CONSTRAINTS = ("max_weight_gb", "max_quality_loss", "min_tokens_per_s")


def _field_of(i: int, candidate: Mapping[str, Any], key: str, *, low: float, low_open: bool,
              allow_inf: bool, rule: str) -> float:
    """``candidate[key]`` as a float, or a ValueError naming the candidate's index and the key."""
    value = candidate[key]
    where = f"candidates[{i}][{key!r}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number {rule}, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)) \
            or value < low or (low_open and value == low):
        raise ValueError(f"{where} must be {rule}, got {value!r}")
    return value


def _checked_candidates(candidates: Any) -> list[dict[str, Any]]:
    """Each candidate as a dict of validated floats (plus its name), in the order given."""
    if isinstance(candidates, (str, bytes, Mapping)) or not isinstance(candidates, Sequence):
        raise ValueError(f"candidates must be a list of mappings (one per deployment option), "
                         f"got {type(candidates).__name__}")
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, Mapping):
            raise ValueError(f"candidates[{i}] must be a mapping with keys "
                             f"{', '.join(CANDIDATE_KEYS)}; got {type(candidate).__name__}")
        missing = [key for key in CANDIDATE_KEYS if key not in candidate]
        if missing:
            raise ValueError(f"candidates[{i}] has no {', '.join(map(repr, missing))} (each "
                             f"candidate needs {', '.join(CANDIDATE_KEYS)})")
        name = candidate["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"candidates[{i}]['name'] must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"candidates[{i}]['name'] {name!r} is also the name of "
                             f"candidates[{seen[name]}]; names must be unique")
        seen[name] = i
        rows.append({
            "name": name,
            "weight_gb": _field_of(i, candidate, "weight_gb", low=0.0, low_open=True,
                                   allow_inf=False, rule="> 0 and finite (GB of weights)"),
            "perplexity": _field_of(i, candidate, "perplexity", low=0.0, low_open=True,
                                    allow_inf=False, rule="> 0 and finite"),
            "tokens_per_s": _field_of(i, candidate, "tokens_per_s", low=0.0, low_open=False,
                                      allow_inf=False, rule=">= 0 and finite (measured tokens/s)"),
            "usd_per_million": _field_of(i, candidate, "usd_per_million", low=0.0, low_open=True,
                                         allow_inf=True, rule="> 0 or inf (USD per 1M tokens)"),
        })
    return rows


def _limit(name: str, value: Any, *, low_open: bool, rule: str) -> float:
    """A constraint: a number, not NaN, at least 0 (``low_open``: above 0), inf allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or value < 0 or (low_open and value == 0) or value == -math.inf:
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
    return float(value)


def decision_rows(candidates: Sequence[Mapping[str, Any]], *, max_weight_gb: float,
                  max_quality_loss: float, min_tokens_per_s: float,
                  baseline: str = "fp32") -> list[dict[str, Any]]:
    """One row per candidate, in the order given: its measured figures, its quality loss and
    which constraints it fails, for a decision table that shows *why* an option is out.

    Each row is ``{"name", "weight_gb", "perplexity", "tokens_per_s", "usd_per_million",
    "quality_loss", "fails", "qualifies"}``. ``quality_loss`` = perplexity / the baseline's
    perplexity - 1 (0.01 = 1 % worse; negative = better than the baseline); ``fails`` lists the
    names of the constraints the candidate breaks, from :data:`CONSTRAINTS`. Every limit is
    inclusive: a candidate exactly at ``max_weight_gb``, at ``max_quality_loss`` or at
    ``min_tokens_per_s`` qualifies (a requirement "at most 1 GB" accepts 1 GB).

    ``candidates`` are mappings with the keys :data:`CANDIDATE_KEYS`; ``baseline`` is the name
    of the candidate quality is measured against. ValueError, naming the candidate and the
    field, on a missing key, a non-number, NaN, a value out of range, duplicate names, or no
    candidate called ``baseline``.
    """
    rows = _checked_candidates(candidates)
    limits = {
        "max_weight_gb": _limit("max_weight_gb", max_weight_gb, low_open=True,
                                rule="> 0 (GB of weights the machine can hold; inf for no limit)"),
        "max_quality_loss": _limit("max_quality_loss", max_quality_loss, low_open=False,
                                   rule=">= 0 (0.01 = perplexity at most 1% above the baseline; "
                                        "inf for no limit)"),
        "min_tokens_per_s": _limit("min_tokens_per_s", min_tokens_per_s, low_open=False,
                                   rule=">= 0 (0 for no limit)"),
    }
    base = [r for r in rows if r["name"] == baseline]
    if not base:
        raise ValueError(f"baseline {baseline!r} is not the name of any candidate (names: "
                         f"{', '.join(repr(r['name']) for r in rows) or 'none'}); quality loss "
                         f"is measured against it")
    base_ppl = base[0]["perplexity"]
    for row in rows:
        row["quality_loss"] = row["perplexity"] / base_ppl - 1
        measured = {"max_weight_gb": row["weight_gb"] <= limits["max_weight_gb"],
                    "max_quality_loss": row["quality_loss"] <= limits["max_quality_loss"],
                    "min_tokens_per_s": row["tokens_per_s"] >= limits["min_tokens_per_s"]}
        row["fails"] = [name for name in CONSTRAINTS if not measured[name]]
        row["qualifies"] = not row["fails"]
    return rows


def choose_deployment(candidates: Sequence[Mapping[str, Any]], *, max_weight_gb: float,
                      max_quality_loss: float, min_tokens_per_s: float,
                      baseline: str = "fp32") -> Mapping[str, Any] | None:
    """The cheapest candidate that meets every requirement, or None when none does.

    A candidate qualifies when ``weight_gb <= max_weight_gb``, its quality loss (perplexity /
    the baseline's - 1) ``<= max_quality_loss`` and ``tokens_per_s >= min_tokens_per_s`` (see
    :func:`decision_rows`, which says which limit each one breaks). Among those, the lowest
    ``usd_per_million`` wins; a tie goes to the smaller ``weight_gb`` (more memory left for the
    KV cache, i.e. for batching), then to the name in alphabetical order, so the answer never
    depends on the order of the list. Returns the candidate mapping itself, as given.
    """
    rows = decision_rows(candidates, max_weight_gb=max_weight_gb,
                         max_quality_loss=max_quality_loss, min_tokens_per_s=min_tokens_per_s,
                         baseline=baseline)
    best = min((i for i, row in enumerate(rows) if row["qualifies"]),
               key=lambda i: (rows[i]["usd_per_million"], rows[i]["weight_gb"], rows[i]["name"]),
               default=None)
    return None if best is None else candidates[best]


__all__ = ["CANDIDATE_KEYS", "CONSTRAINTS", "DEFAULT_INPUT_PRICE_RATIO", "GPU_PRICES",
           "choose_deployment", "cost_from_loadgen", "cost_per_million_tokens", "decision_rows",
           "gpu_price", "quantization_effect", "split_input_output"]
