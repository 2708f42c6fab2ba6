"""course_lib.cost: hand-checked prices, the input/output split, the deployment choice, and
clear errors."""

from __future__ import annotations

import json
import math

import pytest

from course_lib.cost import (
    CANDIDATE_KEYS,
    DEFAULT_INPUT_PRICE_RATIO,
    GPU_PRICES,
    choose_deployment,
    cost_from_loadgen,
    cost_per_million_tokens,
    decision_rows,
    gpu_price,
    quantization_effect,
    split_input_output,
)


def test_hand_checked_price():
    # 2.50 $/h / (50 tok/s * 3600 s/h) = 2.50 / 180000 $/tok = 13.888... $ per 1M tokens.
    assert cost_per_million_tokens(2.50, 50) == pytest.approx(13.8889, abs=1e-4)
    assert round(cost_per_million_tokens(2.50, 50), 2) == 13.89
    # $1/h at 1 tok/s: 1e6 / 3600 = 277.78 $ per 1M.
    assert cost_per_million_tokens(1.0, 1.0) == pytest.approx(277.7778, abs=1e-4)
    assert cost_per_million_tokens(0.0, 10.0) == 0.0  # a free GPU is allowed


def test_utilization_and_throughput_scale_cost():
    full = cost_per_million_tokens(2.50, 50)
    assert cost_per_million_tokens(2.50, 50, utilization=0.5) == pytest.approx(2 * full)
    assert cost_per_million_tokens(2.50, 100) == pytest.approx(full / 2)
    # A quantized model at 2x the tokens/s costs half as much per token.
    assert quantization_effect(full, 2.0) == pytest.approx(full / 2)
    assert quantization_effect(full, 2.0) == pytest.approx(cost_per_million_tokens(2.50, 100))


@pytest.mark.parametrize(("kwargs", "name", "allowed"), [
    ({"gpu_hourly_usd": -1, "tokens_per_second": 50}, "gpu_hourly_usd", ">= 0"),
    ({"gpu_hourly_usd": math.nan, "tokens_per_second": 50}, "gpu_hourly_usd", ">= 0"),
    ({"gpu_hourly_usd": True, "tokens_per_second": 50}, "gpu_hourly_usd", ">= 0"),
    ({"gpu_hourly_usd": "2.5", "tokens_per_second": 50}, "gpu_hourly_usd", ">= 0"),
    ({"gpu_hourly_usd": 2.5, "tokens_per_second": 0}, "tokens_per_second", "> 0"),
    ({"gpu_hourly_usd": 2.5, "tokens_per_second": -3}, "tokens_per_second", "> 0"),
    ({"gpu_hourly_usd": 2.5, "tokens_per_second": math.inf}, "tokens_per_second", "> 0"),
    ({"gpu_hourly_usd": 2.5, "tokens_per_second": 50, "utilization": 0}, "utilization", "(0, 1]"),
    ({"gpu_hourly_usd": 2.5, "tokens_per_second": 50, "utilization": 1.5}, "utilization", "(0, 1]"),
    ({"gpu_hourly_usd": 2.5, "tokens_per_second": 50, "utilization": False}, "utilization",
     "(0, 1]"),
])
def test_bad_input_names_the_argument_and_range(kwargs, name, allowed):
    with pytest.raises(ValueError) as err:
        cost_per_million_tokens(**kwargs)
    assert name in str(err.value) and allowed in str(err.value)


def test_gpu_price_table():
    assert gpu_price("T4") == GPU_PRICES["T4"]
    assert gpu_price("h100-80gb") == GPU_PRICES["H100-80GB"]
    assert "cpu-2-core" in GPU_PRICES
    assert all(isinstance(p, float) and p > 0 for p in GPU_PRICES.values())
    with pytest.raises(ValueError, match=r"unknown GPU 'B300'.*known: .*A100-80GB"):
        gpu_price("B300")


def test_split_pays_exactly_for_the_gpu_time():
    # 3.60 $/h = 0.001 $/s. 100 input tok/s and 50 output tok/s, r = 0.25:
    # out = 0.001 / (50 + 0.25 * 100) * 1e6 = 0.001 / 75 * 1e6 = 13.333 $/1M; in = 3.333 $/1M.
    inp, out = split_input_output(3.60, 100, 50, input_price_ratio=0.25)
    assert out == pytest.approx(13.3333, abs=1e-4) and inp == pytest.approx(3.3333, abs=1e-4)
    # Over one second the tokens pay 100 * in + 50 * out = 0.001 $ * 1e6: the bill, no more.
    assert 100 * inp + 50 * out == pytest.approx(0.001 * 1e6)
    # r = 0: all the time on generated tokens, the classic cost per generated token.
    inp0, out0 = split_input_output(3.60, 100, 50, input_price_ratio=0.0)
    assert inp0 == 0.0 and out0 == pytest.approx(cost_per_million_tokens(3.60, 50))
    # r = 1: every token alike, the blended price.
    inp1, out1 = split_input_output(3.60, 100, 50, input_price_ratio=1.0)
    assert inp1 == out1 == pytest.approx(cost_per_million_tokens(3.60, 150))
    with pytest.raises(ValueError, match="input_price_ratio must be >= 0"):
        split_input_output(3.60, 100, 50, input_price_ratio=-0.1)
    with pytest.raises(ValueError, match="output_tokens_per_second must be > 0"):
        split_input_output(3.60, 100, 0)


def _loadgen_result() -> dict:
    # Shaped like course_lib.serving.loadgen.run_load's output.
    return {
        "config": {"num_prompts": 20, "request_rate": "inf"},
        "summary": {
            "duration": 10.0, "completed": 20,
            "total_input_tokens": 4000, "total_output_tokens": 1000,
            "request_throughput": 2.0, "output_throughput": 100.0,
            "total_token_throughput": 500.0,
        },
        "requests": [],
    }


def test_cost_from_loadgen_hand_checked(tmp_path):
    # $2.50/h for 10 s: run cost = 2.50 * 10 / 3600 = 0.0069444 $.
    # r = 0.25: output tokens carry 1000 + 0.25 * 4000 = 2000 "output-equivalent" tokens,
    #   output = 0.0069444 / 2000 * 1e6 = 3.4722 $/1M, input = 0.25 * that = 0.8681 $/1M.
    # blended: 0.0069444 / 5000 * 1e6 = 1.3889 $/1M; per 1k requests: 0.0069444 / 20 * 1e3
    #   = 0.34722 $ (2 req/s * 10 s = 20 requests).
    got = cost_from_loadgen(_loadgen_result(), hourly_usd=2.50)
    assert got["usd_for_run"] == pytest.approx(0.0069444, abs=1e-7)
    assert got["usd_per_1m_output_tokens"] == pytest.approx(3.4722, abs=1e-4)
    assert got["usd_per_1m_input_tokens"] == pytest.approx(0.8681, abs=1e-4)
    assert got["usd_per_1m_tokens"] == pytest.approx(1.3889, abs=1e-4)
    assert got["usd_per_1k_requests"] == pytest.approx(0.34722, abs=1e-5)
    assert got["inputs"]["hourly_usd"] == 2.50
    assert got["inputs"]["input_price_ratio"] == DEFAULT_INPUT_PRICE_RATIO == 0.25
    assert got["inputs"]["output_tokens_per_second"] == pytest.approx(100.0)
    assert got["inputs"]["input_tokens_per_second"] == pytest.approx(400.0)
    # The tokens pay the run's bill exactly.
    paid = (4000 * got["usd_per_1m_input_tokens"] + 1000 * got["usd_per_1m_output_tokens"]) / 1e6
    assert paid == pytest.approx(got["usd_for_run"])

    # Half utilization doubles everything; a path to the JSON works the same.
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_loadgen_result()))
    half = cost_from_loadgen(str(path), hourly_usd=2.50, utilization=0.5)
    assert half["usd_per_1m_output_tokens"] == pytest.approx(2 * 3.4722, abs=2e-4)
    assert half["usd_per_1k_requests"] == pytest.approx(2 * 0.34722, abs=2e-5)
    assert cost_from_loadgen(path, gpu="T4")["inputs"]["hourly_usd"] == GPU_PRICES["T4"]


def test_cost_from_loadgen_errors():
    good = _loadgen_result()
    with pytest.raises(ValueError, match="exactly one of gpu"):
        cost_from_loadgen(good)
    with pytest.raises(ValueError, match="exactly one of gpu"):
        cost_from_loadgen(good, gpu="T4", hourly_usd=1.0)
    with pytest.raises(ValueError, match="hourly_usd must be >= 0"):
        cost_from_loadgen(good, hourly_usd=-2)
    with pytest.raises(ValueError, match="unknown GPU"):
        cost_from_loadgen(good, gpu="nope")
    missing = _loadgen_result()
    del missing["summary"]["duration"]
    with pytest.raises(ValueError, match="no 'duration'"):
        cost_from_loadgen(missing, hourly_usd=1.0)
    zero = _loadgen_result()
    zero["summary"]["total_output_tokens"] = 0
    with pytest.raises(ValueError, match=r"summary\['total_output_tokens'\] must be > 0"):
        cost_from_loadgen(zero, hourly_usd=1.0)
    with pytest.raises(ValueError, match="throughput_ratio must be > 0"):
        quantization_effect(1.0, 0)


def test_reads_the_keys_the_load_generator_writes():
    loadgen = pytest.importorskip("course_lib.serving.loadgen")
    summary = loadgen.summarize([], 10.0)  # an empty run still has every key
    assert {"duration", "total_input_tokens", "total_output_tokens",
            "request_throughput"} <= summary.keys()
    summary |= {"total_input_tokens": 4000, "total_output_tokens": 1000, "request_throughput": 2.0}
    got = cost_from_loadgen({"config": {}, "summary": summary, "requests": []}, hourly_usd=2.50)
    assert got["usd_per_1m_output_tokens"] == pytest.approx(3.4722, abs=1e-4)


# --- choose_deployment / decision_rows ---------------------------------------------------------

def _cand(name, weight_gb, perplexity, tokens_per_s, usd_per_million, **extra):
    return {"name": name, "weight_gb": weight_gb, "perplexity": perplexity,
            "tokens_per_s": tokens_per_s, "usd_per_million": usd_per_million, **extra}


def _menu():
    # perplexities are multiples of 1/8 over a baseline of 8: every quality loss is exact
    # (int8: 0.015625, int4: 0.125, int3: 0.25), so the boundary tests compare exact numbers.
    return [_cand("fp32", 4.0, 8.0, 20.0, 10.0),
            _cand("int8", 1.0, 8.125, 30.0, 6.0),
            _cand("int4", 0.5, 9.0, 40.0, 5.0),
            _cand("int3", 0.5, 10.0, 40.0, 4.0)]


def _choose(menu, **limits):
    kwargs = {"max_weight_gb": math.inf, "max_quality_loss": math.inf, "min_tokens_per_s": 0.0}
    got = choose_deployment(menu, **(kwargs | limits))
    return None if got is None else got["name"]


def test_cheapest_qualifying_candidate_wins():
    menu = _menu()
    assert _choose(menu) == "int3"  # no limits: the cheapest
    assert _choose(menu, max_quality_loss=0.2) == "int4"  # int3 loses 25 %
    assert _choose(menu, max_quality_loss=0.1) == "int8"
    assert _choose(menu, max_quality_loss=0.01) == "fp32"
    assert _choose(menu, max_weight_gb=0.75, max_quality_loss=0.1) is None
    assert _choose(menu, min_tokens_per_s=25, max_weight_gb=0.9) == "int3"
    got = choose_deployment(menu, max_weight_gb=2, max_quality_loss=0.05, min_tokens_per_s=0)
    assert got is menu[1]  # the mapping itself, extra keys and all


def test_limits_are_inclusive():
    menu = _menu()
    # exactly at each limit qualifies; a hair beyond it does not
    assert _choose(menu, max_quality_loss=0.125) == "int4"
    assert _choose(menu, max_quality_loss=math.nextafter(0.125, 0)) == "int8"
    assert _choose(menu, max_weight_gb=1.0, max_quality_loss=0.1) == "int8"
    assert _choose(menu, max_weight_gb=math.nextafter(1.0, 0), max_quality_loss=0.1) is None
    assert _choose(menu, min_tokens_per_s=30.0, max_quality_loss=0.1) == "int8"
    assert _choose(menu, min_tokens_per_s=math.nextafter(30.0, 99), max_quality_loss=0.1) is None
    assert _choose(menu, max_quality_loss=0) == "fp32"  # the baseline loses nothing


def test_ties_go_to_smaller_weight_then_name_whatever_the_order():
    tied = [_cand("fp32", 4.0, 8.0, 10.0, 9.0), _cand("b", 2.0, 8.0, 10.0, 3.0),
            _cand("a", 2.0, 8.0, 10.0, 3.0), _cand("c", 1.0, 8.0, 10.0, 3.0),
            _cand("d", 0.5, 8.0, 10.0, 3.5)]
    for order in (tied, tied[::-1], tied[2:] + tied[:2]):
        assert _choose(order) == "c"  # price first (d is lighter but dearer), then weight
        assert _choose([r for r in order if r["name"] != "c"]) == "a"  # then the name
    # inf prices (nothing produced) tie too, and lose to any finite price
    menu = [_cand("fp32", 4.0, 8.0, 0.0, math.inf), _cand("x", 1.0, 8.0, 0.0, math.inf)]
    assert _choose(menu) == "x"
    assert _choose([*menu, _cand("y", 9.0, 8.0, 1.0, 1e9)]) == "y"


def test_better_than_baseline_and_other_baseline():
    menu = [_cand("fp32", 4.0, 8.0, 10.0, 9.0), _cand("gptq", 1.0, 7.5, 10.0, 5.0)]
    assert _choose(menu, max_quality_loss=0.0) == "gptq"  # a negative loss meets any limit
    rows = decision_rows(menu, max_weight_gb=2, max_quality_loss=0, min_tokens_per_s=0)
    assert rows[1]["quality_loss"] == -0.0625
    # measured against another baseline, fp32 is 1/15 worse than gptq
    rows = decision_rows(menu, max_weight_gb=9, max_quality_loss=0.05, min_tokens_per_s=0,
                         baseline="gptq")
    assert rows[0]["quality_loss"] == pytest.approx(8 / 7.5 - 1)
    assert rows[0]["fails"] == ["max_quality_loss"] and rows[1]["qualifies"]


def test_decision_rows_say_which_limits_fail():
    rows = decision_rows(_menu(), max_weight_gb=0.75, max_quality_loss=0.125,
                         min_tokens_per_s=35)
    assert [r["name"] for r in rows] == ["fp32", "int8", "int4", "int3"]
    assert [r["quality_loss"] for r in rows] == [0.0, 0.015625, 0.125, 0.25]
    assert [r["fails"] for r in rows] == [
        ["max_weight_gb", "min_tokens_per_s"], ["max_weight_gb", "min_tokens_per_s"], [],
        ["max_quality_loss"]]
    assert [r["qualifies"] for r in rows] == [False, False, True, False]
    assert set(CANDIDATE_KEYS) <= set(rows[0])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m[1].pop("perplexity"), r"candidates\[1\] has no 'perplexity'"),
    (lambda m: m[2].update(weight_gb=math.nan), r"candidates\[2\]\['weight_gb'\] must be > 0"),
    (lambda m: m[2].update(weight_gb=0), r"candidates\[2\]\['weight_gb'\] must be > 0"),
    (lambda m: m[3].update(tokens_per_s=-1.0), r"candidates\[3\]\['tokens_per_s'\] must be >= 0"),
    (lambda m: m[3].update(tokens_per_s=math.inf), r"\['tokens_per_s'\] must be >= 0 and finite"),
    (lambda m: m[0].update(perplexity=math.nan), r"candidates\[0\]\['perplexity'\] must be > 0"),
    (lambda m: m[0].update(perplexity="8"), r"\['perplexity'\] must be a number"),
    (lambda m: m[1].update(usd_per_million=0.0), r"\['usd_per_million'\] must be > 0 or inf"),
    (lambda m: m[1].update(usd_per_million=-math.inf), r"\['usd_per_million'\] must be > 0 or inf"),
    (lambda m: m[1].update(usd_per_million=math.nan), r"\['usd_per_million'\] must be > 0 or inf"),
    (lambda m: m[1].update(usd_per_million=True), r"\['usd_per_million'\] must be a number"),
    (lambda m: m[3].update(name="int8"), r"candidates\[3\]\['name'\] 'int8' is also the name of "
                                         r"candidates\[1\]; names must be unique"),
    (lambda m: m[3].update(name=""), r"candidates\[3\]\['name'\] must be a non-empty string"),
    (lambda m: m.append("int2"), r"candidates\[4\] must be a mapping"),
    (lambda m: m.pop(0), r"baseline 'fp32' is not the name of any candidate \(names: 'int8'"),
])
def test_bad_candidates_name_the_index_and_field(edit, message):
    menu = _menu()
    edit(menu)
    for fn in (choose_deployment, decision_rows):
        with pytest.raises(ValueError, match=message):
            fn(menu, max_weight_gb=1, max_quality_loss=0.1, min_tokens_per_s=0)


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_weight_gb": 0}, "max_weight_gb must be a number > 0"),
    ({"max_weight_gb": math.nan}, "max_weight_gb must be a number > 0"),
    ({"max_quality_loss": -0.01}, "max_quality_loss must be a number >= 0"),
    ({"min_tokens_per_s": -1}, "min_tokens_per_s must be a number >= 0"),
    ({"min_tokens_per_s": None}, "min_tokens_per_s must be a number >= 0"),
    ({"baseline": "bf16"}, "baseline 'bf16' is not the name of any candidate"),
])
def test_bad_limits_are_named(limits, message):
    kwargs = {"max_weight_gb": 1.0, "max_quality_loss": 0.1, "min_tokens_per_s": 0.0} | limits
    with pytest.raises(ValueError, match=message):
        choose_deployment(_menu(), **kwargs)


def test_candidates_must_be_a_list():
    for bad in ({"name": "fp32"}, "fp32", None):
        with pytest.raises(ValueError, match="candidates must be a list of mappings"):
            choose_deployment(bad, max_weight_gb=1, max_quality_loss=0.1, min_tokens_per_s=0)
    with pytest.raises(ValueError, match=r"baseline 'fp32' is not .*\(names: none\)"):
        choose_deployment([], max_weight_gb=1, max_quality_loss=0.1, min_tokens_per_s=0)
