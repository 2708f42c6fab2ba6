"""course_lib.cost: hand-checked prices, the input/output split, and clear errors."""

from __future__ import annotations

import json
import math

import pytest

from course_lib.cost import (
    DEFAULT_INPUT_PRICE_RATIO,
    GPU_PRICES,
    cost_from_loadgen,
    cost_per_million_tokens,
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
