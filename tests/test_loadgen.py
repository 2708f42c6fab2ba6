"""The serving load generator: its metrics by hand, and a run against a fake streaming server."""

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

from course_lib.serving import loadgen
from course_lib.serving.loadgen import (
    RequestResult,
    arrival_intervals,
    check_loopback,
    latency_metrics,
    meets_slos,
    parse_slos,
    run_load,
    summarize,
)

# ---------------------------------------------------------------- metrics, checked by hand


def test_latency_metrics_by_hand():
    m = latency_metrics(0.0, [0.5, 0.6, 0.8], 0.8)
    assert m["ttft"] == pytest.approx(0.5)
    assert m["e2e"] == pytest.approx(0.8)
    assert m["itl"] == pytest.approx([0.1, 0.2])
    assert m["tpot"] == pytest.approx(0.15)  # (0.8 - 0.5) / (3 - 1)


def test_latency_metrics_tpot_uses_output_tokens_and_start_offset():
    # 2 chunks carrying 5 tokens: TPOT divides the decode time by 4 tokens, not 1 chunk gap
    m = latency_metrics(10.0, [10.2, 11.0], 11.0, output_tokens=5)
    assert m["ttft"] == pytest.approx(0.2)
    assert m["tpot"] == pytest.approx(0.8 / 4)
    assert m["itl"] == pytest.approx([0.8])


def test_latency_metrics_one_token_has_no_tpot():
    m = latency_metrics(0.0, [0.3], 0.4)
    assert m["tpot"] is None and m["itl"] == [] and m["e2e"] == pytest.approx(0.4)
    assert latency_metrics(0.0, [0.3], 0.4, output_tokens=1)["tpot"] is None


@pytest.mark.parametrize("start, times, end", [
    (0.0, [], 1.0),             # no token
    (0.0, [0.5, 0.4], 1.0),     # tokens out of order
    (0.6, [0.5], 1.0),          # token before the start
    (0.0, [0.5, 0.9], 0.8),     # end before the last token
])
def test_latency_metrics_rejects_bad_times(start, times, end):
    with pytest.raises(ValueError, match="token_times"):
        latency_metrics(start, times, end)


def test_parse_slos_converts_ms_to_seconds():
    assert parse_slos(["ttft:500", "tpot:50", "e2e:2000"]) == pytest.approx(
        {"ttft": 0.5, "tpot": 0.05, "e2e": 2.0})
    assert parse_slos(["e2el:1500"]) == {"e2e": 1.5}  # vLLM's spelling
    assert parse_slos([]) == {}


@pytest.mark.parametrize("item", ["ttf:500", "ttft", "ttft:abc", "ttft:-5", "ttft:0", "ttft:inf"])
def test_parse_slos_errors_name_item_and_allowed_keys(item):
    with pytest.raises(ValueError) as info:
        parse_slos([item])
    assert repr(item) in str(info.value) and "ttft, tpot, e2e" in str(info.value)


def test_parse_slos_rejects_a_repeated_key():
    with pytest.raises(ValueError, match="repeats"):
        parse_slos(["ttft:500", "ttft:200"])


def test_meets_slos():
    m = {"ttft": 0.4, "tpot": 0.06, "e2e": 1.0, "itl": []}
    assert meets_slos(m, {"ttft": 0.5})
    assert not meets_slos(m, {"ttft": 0.5, "tpot": 0.05})
    assert meets_slos(m, {"ttft": 0.4, "e2e": 1.0})  # at the limit meets it
    assert meets_slos({**m, "tpot": None}, {"tpot": 0.001})  # one token: no TPOT to miss
    assert meets_slos(m, {})


def _result(ttft: float, gap: float, n: int, start: float = 0.0) -> RequestResult:
    times = [start + ttft + i * gap for i in range(n)]
    return RequestResult(True, 10, n, start, times, times[-1])


def test_summarize_counts_goodput_and_percentile_keys():
    results = [_result(0.1, 0.02, 11), _result(0.3, 0.02, 11), _result(0.1, 0.08, 11),
               RequestResult(False, 0, 0, 0.0, [], 0.5, "HTTP 503: busy"),
               RequestResult(False, 0, 0, 0.0, [0.1], 0.5, "error in stream: boom")]
    s = summarize(results, duration=2.0, slos={"ttft": 0.2, "tpot": 0.05})
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["errors"] == ["HTTP 503: busy", "error in stream: boom"]
    assert s["goodput"] == pytest.approx(1 / 2.0)  # only the first meets both SLOs
    assert s["request_throughput"] == pytest.approx(3 / 2.0)
    assert s["total_output_tokens"] == 33 and s["output_throughput"] == pytest.approx(33 / 2)
    assert s["total_input_tokens"] == 30 and s["total_token_throughput"] == pytest.approx(63 / 2)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert f"{stat}_{metric}_ms" in s
    ttfts = np.array([100.0, 300.0, 100.0])
    assert s["mean_ttft_ms"] == pytest.approx(ttfts.mean())
    assert s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile(ttfts, 99))
    assert s["mean_tpot_ms"] == pytest.approx(np.mean([20, 20, 80]))
    assert s["median_itl_ms"] == pytest.approx(20.0)  # 20 of the 30 gaps are 20 ms
    assert s["mean_e2el_ms"] == pytest.approx(np.mean([300, 500, 900]))
    assert "goodput" not in summarize(results, 2.0)


def test_summarize_counts_a_rejection_apart_from_failures():
    results = [_result(0.1, 0.02, 11),
               RequestResult(False, 0, 0, 0.0, [], 0.1, "HTTP 503: queue full", rejected=True,
                             retry_after=1.0),
               RequestResult(False, 0, 0, 0.0, [], 0.1, "HTTP 503: no header")]
    s = summarize(results, duration=1.0)
    assert (s["completed"], s["failed"], s["rejected"]) == (1, 1, 1)
    assert s["errors"] == ["HTTP 503: no header"]  # the failures' errors only
    assert s["request_throughput"] == pytest.approx(1.0)
    assert summarize([_result(0.1, 0.02, 3)], 1.0)["rejected"] == 0


def test_parse_retry_after():
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    assert loadgen.parse_retry_after("1") == 1.0
    assert loadgen.parse_retry_after(" 0 ") == 0.0
    for bad in (None, "", "soon", "-1", "1.5", "inf"):
        assert loadgen.parse_retry_after(bad) is None, bad
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert loadgen.parse_retry_after(soon) == pytest.approx(30, abs=2)
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert loadgen.parse_retry_after(past) == 0.0


def test_summarize_without_successes_has_no_latencies():
    s = summarize([RequestResult(False, error="x")], 1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["output_throughput"] == 0


def test_arrival_intervals():
    assert arrival_intervals(5, float("inf")) == [0.0] * 5
    assert arrival_intervals(100, 4.0, seed=3) == arrival_intervals(100, 4.0, seed=3)
    assert arrival_intervals(100, 4.0, seed=3) != arrival_intervals(100, 4.0, seed=4)
    for burstiness in (1.0, 0.5, 4.0):
        gaps = np.array(arrival_intervals(20_000, 4.0, burstiness, seed=0))
        assert gaps.mean() == pytest.approx(0.25, rel=0.05)
        # gamma(k, θ): variance k θ² = mean² / k, so the coefficient of variation is 1/sqrt(k)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / burstiness ** 0.5, rel=0.1)
    with pytest.raises(ValueError):
        arrival_intervals(3, 0.0)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/",
                                 "http://[::1]:8000", "https://127.0.0.1"])
def test_check_loopback_accepts_this_machine(url):
    check_loopback(url)


@pytest.mark.parametrize("url", ["http://example.com", "http://10.0.0.1:8000",
                                 "http://127.0.0.1@example.com", "ftp://127.0.0.1",
                                 "http://0.0.0.0:8000", "127.0.0.1:8000"])
def test_check_loopback_rejects_other_hosts(url):
    with pytest.raises(ValueError, match="this machine"):
        check_loopback(url)


def test_run_load_refuses_remote_url():
    with pytest.raises(ValueError, match="this machine"):
        asyncio.run(run_load("http://example.com", "m", num_prompts=1, progress=False))


# ---------------------------------------------------------------- a fake streaming server

class FakeServer:
    """An OpenAI-style streaming /v1/completions under a URL prefix that picks its behaviour.

    ``/ok``: one chunk per 2 tokens (the usage chunk counts them all), an empty chunk first;
    ``/nousage``: no usage chunk; ``/mixed``: request i gets 503 when i % 4 == 1 and an error
    chunk mid-stream when i % 4 == 3; ``/nodone``: no ``data: [DONE]``. ``/shed``: request i
    gets the real server's queue-full answer (503, ``Retry-After: 1``) when i is even;
    ``/shed-noheader``, ``/shed-badheader`` and ``/shed-429`` the same but without Retry-After,
    with ``Retry-After: soon``, and as a 429. Records its peak number of requests in flight and
    the last request body.
    """

    def __init__(self, chunk_sleep: float = 0.01):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        self.in_flight = self.peak = self.count = 0
        self.last_body: dict = {}
        app = FastAPI()

        @app.post("/{variant}/v1/completions")
        async def completions(variant: str, request: Request):
            body = await request.json()
            self.last_body, i = body, self.count
            self.count += 1
            if variant == "mixed" and i % 4 == 1:
                return JSONResponse({"error": {"message": "queue full", "type": "server_busy",
                                               "param": None, "code": 503}}, status_code=503)
            if variant.startswith("shed") and i % 2 == 0:
                headers = {"shed": {"Retry-After": "1"}, "shed-badheader": {"Retry-After": "soon"},
                           "shed-429": {"Retry-After": "1"}}.get(variant)
                return JSONResponse({"error": {"message": "the waiting queue is full",
                                               "type": "service_unavailable_error", "param": None,
                                               "code": "queue_full"}},
                                    status_code=429 if variant == "shed-429" else 503,
                                    headers=headers)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            n = body["max_tokens"]

            async def stream():
                try:
                    def sse(obj):
                        return f"data: {json.dumps(obj)}\n\n"

                    yield sse({"choices": [{"index": 0, "text": ""}]})
                    for k in range(0, n, 2):
                        await asyncio.sleep(chunk_sleep)
                        if variant == "mixed" and i % 4 == 3 and k >= 2:
                            yield sse({"error": {"message": "engine died", "type": "x",
                                                 "param": None, "code": 500}})
                            return
                        yield sse({"choices": [{"index": 0, "text": " a b"[: 2 * min(2, n - k)]}]})
                    if variant != "nousage":
                        yield sse({"choices": [], "usage": {
                            "prompt_tokens": len(body["prompt"].split()), "completion_tokens": n,
                            "total_tokens": n + len(body["prompt"].split())}})
                finally:
                    self.in_flight -= 1  # before [DONE]: a client slot frees only after it
                if variant != "nodone":
                    yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)

    def reset(self):
        self.in_flight = self.peak = self.count = 0

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def fake():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    server = FakeServer()
    yield server
    server.stop()


def _run(url: str, **kw) -> dict:
    kw = {"num_prompts": 8, "output_len": 6, "prompt_len": 5, "progress": False, **kw}
    return asyncio.run(run_load(url, "fake-model", **kw))


def test_run_load_all_succeed_usage_counts_tokens(fake):
    fake.reset()
    out = _run(fake.url + "/ok", num_prompts=6, output_len=7, prompt_len=5, seed=1)
    s = out["summary"]
    assert (s["completed"], s["failed"]) == (6, 0)
    assert s["total_output_tokens"] == 6 * 7  # from usage, not the 4 chunks per request
    assert s["total_input_tokens"] == 6 * 5
    for r in out["requests"]:
        assert r["success"] and r["error"] is None and r["output_tokens"] == 7
        assert len(r["itl"]) == 3  # 4 chunks with text; the empty first chunk is not a token
        assert 0 < r["ttft"] <= r["e2e"]
        assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / 6)
    body = fake.last_body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["temperature"] == 0
    assert body["model"] == "fake-model" and len(body["prompt"].split()) == 5
    assert out["config"]["request_rate"] == "inf" and out["config"]["issued"] == 6
    json.dumps(out, allow_nan=False)  # the result is plain JSON


def test_run_load_output_tokens_without_usage_count_chunks(fake):
    s = _run(fake.url + "/nousage", num_prompts=2, output_len=6)["summary"]
    assert (s["completed"], s["total_output_tokens"], s["total_input_tokens"]) == (2, 6, 0)


def test_run_load_records_failures_without_raising(fake):
    fake.reset()
    out = _run(fake.url + "/mixed", num_prompts=8)
    s = out["summary"]
    assert (s["completed"], s["failed"]) == (4, 4)
    errors = [r["error"] for r in out["requests"] if not r["success"]]
    assert sum(e.startswith("HTTP 503: queue full") for e in errors) == 2
    assert sum("engine died" in e for e in errors) == 2
    assert s["total_output_tokens"] == 4 * 6  # failed requests' tokens are not counted

    s = _run(fake.url + "/nodone", num_prompts=2)["summary"]
    assert s["failed"] == 2 and "[DONE]" in s["errors"][0]


def test_run_load_503_with_retry_after_is_rejected_not_failed(fake, tmp_path, capsys):
    fake.reset()
    out = _run(fake.url + "/shed", num_prompts=8)
    s = out["summary"]
    assert (s["completed"], s["rejected"], s["failed"]) == (4, 4, 0)
    assert s["errors"] == [] and s["total_output_tokens"] == 4 * 6
    rejected = [r for r in out["requests"] if r["rejected"]]
    assert len(rejected) == 4 and not any(r["success"] for r in rejected)
    assert all(r["error"].startswith("HTTP 503: the waiting queue is full") for r in rejected)
    assert "Rejected requests" in loadgen.format_summary(s)
    import argparse

    parser = argparse.ArgumentParser()
    loadgen.add_bench_serve_arguments(parser)
    fake.reset()  # rejections alone do not fail the command
    assert loadgen.bench_serve_cli(parser.parse_args(["--url", fake.url + "/shed", "--quiet",
                                                      "--num-prompts", "4"])) == 0


@pytest.mark.parametrize("variant", ["shed-noheader", "shed-badheader", "shed-429"])
def test_run_load_shedding_without_a_valid_retry_after_is_a_failure(fake, variant):
    fake.reset()
    out = _run(fake.url + "/" + variant, num_prompts=4)
    s = out["summary"]
    assert (s["completed"], s["rejected"], s["failed"]) == (2, 0, 2)
    assert not any(r["rejected"] for r in out["requests"])


def test_run_load_stream_without_done_or_with_error_chunk_is_a_failure(fake):
    s = _run(fake.url + "/nodone", num_prompts=2)["summary"]
    assert (s["completed"], s["rejected"], s["failed"]) == (0, 0, 2)
    fake.reset()
    s = _run(fake.url + "/mixed", num_prompts=4)["summary"]  # a 503 without Retry-After, an error chunk
    assert (s["completed"], s["rejected"], s["failed"]) == (2, 0, 2)


def test_closed_loop_client_waits_retry_after_capped(fake):
    fake.reset()  # one client: rejected, ok, rejected
    t = time.perf_counter()
    out = _run(fake.url + "/shed", num_prompts=3, max_concurrency=1, retry_after_cap=0.3)
    elapsed = time.perf_counter() - t
    r = out["requests"]
    assert [x["rejected"] for x in r] == [True, False, True]
    gap = r[1]["start"] - (r[0]["start"] + r[0]["e2e"])
    assert 0.28 <= gap < 0.6  # waited the cap (0.3 s), not Retry-After's 1 s
    assert 0.55 <= elapsed < 1.5  # the last rejected request waited too
    fake.reset()  # without a cap below it, the client waits the whole second
    out = _run(fake.url + "/shed", num_prompts=2, max_concurrency=1)
    r = out["requests"]
    assert 0.95 <= r[1]["start"] - (r[0]["start"] + r[0]["e2e"]) < 1.5


def test_retry_wait_ends_with_the_duration(fake):
    fake.reset()
    t = time.perf_counter()
    out = _run(fake.url + "/shed", num_prompts=100, max_concurrency=1, duration=0.3)
    assert time.perf_counter() - t < 0.7  # not the 1 s Retry-After
    assert out["config"]["issued"] == 1 and out["summary"]["rejected"] == 1


def test_open_loop_does_not_wait_after_a_rejection(fake):
    fake.reset()
    t = time.perf_counter()
    s = _run(fake.url + "/shed", num_prompts=6)["summary"]
    assert s["rejected"] == 3 and time.perf_counter() - t < 0.9


def test_run_load_connection_refused_is_a_failure():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    s = _run(f"http://127.0.0.1:{port}", num_prompts=2)["summary"]
    assert (s["completed"], s["failed"]) == (0, 2) and "Connect" in s["errors"][0]


def test_max_concurrency_limits_requests_in_flight(fake):
    fake.reset()
    assert _run(fake.url + "/ok", num_prompts=12, max_concurrency=3)["summary"]["completed"] == 12
    assert fake.peak == 3
    fake.reset()
    _run(fake.url + "/ok", num_prompts=12)  # no limit, all at t = 0
    assert fake.peak > 3


def test_duration_bounds_the_run(fake):
    fake.reset()
    t = time.perf_counter()
    out = _run(fake.url + "/ok", num_prompts=100_000, max_concurrency=4, duration=0.5)
    elapsed = time.perf_counter() - t
    s = out["summary"]
    assert elapsed < 2.0 and s["duration"] < 2.0
    assert s["failed"] == 0 and 4 <= s["completed"] < 1000  # ~30 ms a request, 4 at a time
    assert out["config"]["issued"] == s["completed"] == fake.count
    # at 2 requests/s the second would leave at 0.5 s, after the end: the run does not wait for it
    t = time.perf_counter()
    out = _run(fake.url + "/ok", num_prompts=10, request_rate=2.0, burstiness=1e6, duration=0.3)
    assert out["config"]["issued"] == 1 and time.perf_counter() - t < 0.45


def test_request_rate_spaces_the_starts(fake):
    out = _run(fake.url + "/ok", num_prompts=5, output_len=2, request_rate=20.0, burstiness=1e6)
    starts = [r["start"] for r in out["requests"]]
    # burstiness 1e6: gaps are almost exactly 1/rate = 50 ms
    assert np.diff(starts) == pytest.approx([0.05] * 4, abs=0.02)


def test_bench_serve_cli_writes_json_and_exit_code(fake, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    loadgen.add_bench_serve_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--url", fake.url + "/ok", "--num-prompts", "3", "--output-len", "4",
                              "--goodput", "ttft:5000", "tpot:1000", "--out", str(out), "--quiet"])
    assert loadgen.bench_serve_cli(args) == 0
    text = capsys.readouterr().out
    assert "Successful requests:" in text and "Request goodput (req/s):" in text
    saved = json.loads(out.read_text())
    assert saved["summary"]["completed"] == 3 and saved["summary"]["goodput"] > 0
    args = parser.parse_args(["--url", fake.url + "/mixed", "--num-prompts", "4", "--quiet"])
    assert loadgen.bench_serve_cli(args) == 1
    args = parser.parse_args(["--url", "http://10.0.0.1", "--quiet"])
    assert loadgen.bench_serve_cli(args) == 2
    assert "this machine" in capsys.readouterr().out
