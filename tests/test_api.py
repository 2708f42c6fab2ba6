"""The OpenAI-compatible server, on a real loopback port, driven by the real ``openai`` client.

The server runs in a background thread of this process (uvicorn, the same app ``course-lib
serve`` runs), so tests can also look at the engine behind it. ``test_cli_serve_drains_on_sigterm``
runs the command itself in a child process.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from course_lib.models.hub import load_model
from course_lib.serving.api import create_app
from course_lib.serving.engine import LLMEngine
from course_lib.serving.launch import ServerProcess, free_port
from course_lib.serving.sequence import SamplingParams

PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny", device="cpu")
    return model, tokenizer


class ServerThread:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self):
        return self.app.state.server.engine


def serve(tiny, **kwargs) -> ServerThread:
    engine_kwargs = {k: kwargs.pop(k) for k in ("num_blocks", "max_num_seqs") if k in kwargs}
    engine_kwargs.setdefault("num_blocks", 128)
    return ServerThread(create_app(lambda: LLMEngine(*tiny, **engine_kwargs), "tiny", **kwargs))


@pytest.fixture(scope="module")
def server(tiny):
    with serve(tiny) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(tiny, prompt: str, max_tokens: int) -> str:
    """What the engine itself generates, greedily, without the server."""
    engine = LLMEngine(*tiny, num_blocks=64)
    out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0),
                          progress=False)[0]
    return tiny[1].decode(out.output_token_ids)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# --- the openai client ---------------------------------------------------------------------------


def test_completion_matches_the_engine(tiny, client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.choices[0].text == greedy_text(tiny, PROMPT, 12)
    assert out.choices[0].finish_reason == "length"
    n_prompt = len(tiny[1].encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (n_prompt, 12, n_prompt + 12)


def test_stream_with_usage_sends_the_same_text(tiny, client):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_text(tiny, PROMPT, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_completion_and_its_stream(client):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write a loop."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_stop_string_is_cut_out(tiny, client):
    full = greedy_text(tiny, PROMPT, 16)
    stop = full[5:8]  # a stop string that greedy decoding is certain to produce
    assert stop.strip(), f"pick another slice of {full!r}"
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]


def test_n_choices_and_seeded_sampling(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same texts
    assert len({c.text for c in a.choices}) > 1  # but each choice its own seed
    assert a.usage.completion_tokens == 24


def test_models_version_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ready"}
    assert "version" in httpx.get(server.url + "/version").json()


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100, prompt="word " * 600), "prompt"),  # over the 512-token context
    (dict(max_tokens=500, prompt="word " * 100), "max_tokens"),  # prompt fits, the total does not
    (dict(temperature=3.0), "temperature"),
    (dict(logprobs=2), "logprobs"),
    (dict(n=0), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
])
def test_invalid_requests_get_400_naming_the_field(client, kwargs, param):
    kwargs = {"model": "tiny", "prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "gpt-9" in info.value.body["message"]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny"}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": []}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": 42}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": None}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": True}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": "0.5"}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "messages": []}).encode(), "prompt"),
])
def test_malformed_bodies_get_400_not_422(server, body, param):
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                          "temperature": 0, "user": "u", "zzz": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# --- load shedding, disconnects, failures ------------------------------------------------------------


def test_full_queue_gets_503_with_retry_after(tiny):
    with serve(tiny, max_num_seqs=1, max_queue=1) as s:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", s.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # (kept: a dropped iterator would close the connection)
            next(lines)  # the first chunk: this one is running
            waiting = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", json=body,
                                                                 timeout=60), daemon=True)
            waiting.start()
            assert wait_for(lambda: s.engine.num_waiting == 1)
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"


def test_disconnect_mid_stream_frees_the_blocks(server):
    aborted = metric(server, "vllm:request_success_total", finished_reason="abort")
    generated = metric(server, "vllm:generation_tokens_total")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(server, "vllm:kv_cache_usage_perc") > 0
    # the client has gone: the request is aborted and every block freed, long before 480 tokens
    assert wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0
                    and metric(server, "vllm:num_requests_running") == 0)
    assert server.engine.num_unfinished == 0
    assert metric(server, "vllm:generation_tokens_total") - generated < 100
    assert metric(server, "vllm:request_success_total", finished_reason="abort") == aborted + 1


def test_a_failure_mid_stream_sends_an_error_chunk_then_done(server, monkeypatch):
    engine = server.engine.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device error")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "simulated device error" in json.loads(events[-2])["error"]["message"]
    monkeypatch.undo()
    assert wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0)
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200  # the server goes on serving


# --- metrics, keys, loading ----------------------------------------------------------------------------


def test_metrics_parse_and_count_what_was_served(server, client):
    before = metric(server, "vllm:generation_tokens_total", model_name="tiny")
    done = metric(server, "vllm:request_success_total", finished_reason="length")
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0)
    assert metric(server, "vllm:generation_tokens_total") == before + 7
    assert metric(server, "vllm:request_success_total", finished_reason="length") == done + 1
    names = {s.name for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
             for s in f.samples}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:request_queue_time_seconds_count"):
        assert name in names
    assert metric(server, "vllm:time_to_first_token_seconds_count") >= 1


def test_api_key_guards_v1_only(tiny):
    with serve(tiny, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_health_is_503_while_the_model_loads(tiny):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return LLMEngine(*tiny, num_blocks=16)

    thread = ServerThread(create_app(slow_load, "tiny"))
    thread.thread.start()
    try:
        assert wait_for(lambda: _status(thread.url + "/health") == 503)
        r = httpx.post(thread.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        assert wait_for(lambda: _status(thread.url + "/health") == 200)
    finally:
        release.set()
        thread.__exit__()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url).status_code
    except httpx.TransportError:
        return None


def sigterm_mid_stream(shutdown_timeout: float, max_tokens: int, while_draining=None):
    """`course-lib serve` in a child process: open a stream, SIGTERM after its first chunk, run
    ``while_draining(server)``, read the rest. Returns (data lines after the first, exit code,
    seconds from the signal to the exit)."""
    server = ServerProcess("--model", "tiny", "--shutdown-timeout", str(shutdown_timeout), threads=1).start()
    try:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            signalled = time.monotonic()
            server.proc.send_signal(15)
            if while_draining is not None:
                while_draining(server)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        code = server.proc.wait(60)
        return rest, code, time.monotonic() - signalled
    finally:
        server.kill()


def test_cli_serve_drains_on_sigterm():
    """SIGTERM: /health 503, new requests 503, the request in flight still completes, exit 0."""
    def refuses_new_work(server):
        assert wait_for(lambda: _status(server.url + "/health") == 503)
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}).status_code == 503

    rest, code, _ = sigterm_mid_stream(60, 150, refuses_new_work)
    assert rest[-1] == "[DONE]" and code == 0
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"


def test_cli_serve_cuts_off_at_the_shutdown_timeout():
    """A request still running when --shutdown-timeout runs out gets an error chunk and [DONE];
    the process exits soon after, not when the request would have finished."""
    rest, code, seconds = sigterm_mid_stream(1, 480)
    assert rest[-1] == "[DONE]" and code == 0
    assert "--shutdown-timeout 1 s" in json.loads(rest[-2])["error"]["message"]
    assert seconds < 8 and len(rest) < 400  # cut off, not run to the end


def test_a_quantized_checkpoint_serves_like_the_quantized_hf_model(tiny, tmp_path):
    """`serve --quantized DIR`: chapter 3's checkpoint (made from the HF model) drops into our GPT."""
    import torch

    from course_lib.quant.checkpoint import save_quantized
    from course_lib.quant.qlinear import QuantLinear, quantize_model
    from course_lib.serving.server import engine_loader

    quantized, report = quantize_model(tiny[0], bits=4, group_size=32)
    save_quantized(quantized, tmp_path / "w4", report)
    engine = engine_loader("tiny", str(tmp_path / "w4"), device="cpu", num_blocks=32)()
    assert sum(isinstance(m, QuantLinear) for m in engine.model.modules()) == 24
    ids = tiny[1].encode(PROMPT)
    out = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0), progress=False)[0]
    want = quantized.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert out.output_token_ids == want.tolist()
