"""Claim: our OpenAI-compatible server **sheds load instead of failing**: 128 concurrent
streaming clients for 60 s against a small waiting queue (``--max-queue 8``) see **zero failed
requests** (the only refusals are 503 + ``Retry-After``), and the same with **hostile requests
mixed in**, each answered as it should be, after which the server is idle (nothing running, KV
cache empty) and healthy. And continuous batching makes it scale: **output tokens/s at 8
concurrent clients >= 3x that at 1 client**.

The sweep runs once per model of ``--models`` (default ``smollm2-135m tiny``: SmolLM2-135M-
Instruct, the LLaMA-family model, is the headline; the bundled tiny GPT-2 is the second row),
each on its own server, each with its own 8-vs-1 ratio measured in this run. The script starts
the real server as a subprocess (``python -m course_lib serve --model MODEL --port <free port>
--max-queue 256``, with ``OMP_NUM_THREADS=--threads``, by default the course's rule ``runtime.cpu_threads(shared=True)``:
1 on this 2-core machine, where the load generator needs the other core), waits for ``GET /health``, and loads it with
``course_lib.serving.loadgen`` (vLLM's ``benchmark_serving.py`` method: streaming
``/v1/completions``, TTFT, TPOT = (E2E - TTFT)/(n - 1), ITL, E2E) at a sweep of fixed
concurrencies (default 1, 2, 4, 8, 16, 32). Each level is a closed loop: C clients, each sending
its next request as soon as its last one finished (prompts of 32 random words, ``ignore_eos``,
greedy), for ``--duration`` s (default 20). No request starts after the time is up and every
one in flight is waited for. Per model (``SWEEPS``): the tiny model 64 output tokens, no cap on
requests; SmolLM2 (~10x slower per step on a CPU) 32 output tokens and at most 16 requests per
level, a level of more clients than that (32) being cut. For the 8-vs-1 ratio, concurrency 1
and 8 are then run ``--ratio-repeats`` more times (default 2), alternating, and the means
compared: this VM's speed drifts by up to ~30% over minutes, and the sweep's two runs are a
minute apart.

The soak then starts a server of ``--soak-model`` (default tiny) with ``--max-queue
--soak-max-queue`` (default 8), and runs
``--soak-concurrency`` (default 128) closed-loop clients for ``--soak-duration`` s (default
60). A 503 with ``Retry-After`` is counted as *rejected*, not failed, and that client waits the
Retry-After seconds (at most 2) before its next request; anything else that is not a complete
stream is a failure. Then the hostile soak: the same load again, plus ``--hostile-clients``
(default 8) closed-loop clients sending, in rotation, a ``seed`` above and below the signed
64-bit range, ``seed + n - 1`` past it, a prompt with an unpaired surrogate (``\\ud800`` in
the raw JSON), five ``stop`` strings, a prompt longer than the context, invalid JSON, a 5 MiB
body (with ``Content-Length``, and chunked) and a stream dropped after 3 chunks. Each answer is
checked: 400 with OpenAI's error JSON (message/type/param/code) naming the field in ``param``,
413 ``request_too_large`` for the bodies, and for the dropped stream a 200 that was streaming
(or a 503 + Retry-After). After it, ``/metrics`` must show ``vllm:num_requests_running`` 0 and
``vllm:kv_cache_usage_perc`` 0 (polled for up to 10 s) and ``/health`` 200.

    python benchmarks/serve.py [--quick] [--only sweep|soak] [--models smollm2-135m tiny]
                               [--concurrency 1 2 4 8 16 32] [--max-requests N]
                               [--duration 20] [--soak-concurrency 128] [--soak-duration 60]
                               [--soak-max-queue 8] [--hostile-clients 8] [--threads N]
                               [--url http://127.0.0.1:PORT]

``--url`` loads a server that is already running instead of starting any (the soak then runs
against whatever queue limit it has; only the first of ``--models`` is swept, by that name).
``--only sweep --soaks-from FILE`` re-measures the sweeps and copies the soaks from an earlier
full result (recorded as ``soaks_from``), writing a full result. Writes
``benchmarks/results/serve-<machine>.json`` (or ``--out``; one section per model under
``models``, the headline's sweep also at the top level) and a plot ``.png`` beside it (per
model: output tokens/s, and TTFT and TPOT p50/p99, against concurrency). Exits 1 when a check
fails (unless ``--no-fail``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from course_lib import runtime, viz
from course_lib.serving.launch import ServerProcess
from course_lib.serving.loadgen import RETRY_AFTER_CAP, check_loopback, parse_retry_after, run_load
from course_lib.serving.sequence import SEED_MAX, SEED_MIN

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 3.0
BIG_BODY_BYTES = 5 * 2**20  # over the server's default --max-body-bytes (4 MiB)
DROP_AFTER_CHUNKS = 3  # the disconnecting client reads this many chunks with text, then leaves
ERROR_KEYS = {"message", "type", "param", "code"}
SOAK_OUTPUT_LEN = 64
#: per-model sweep settings. SmolLM2-135M (fp32, ~540 MB of weights read per forward pass) decodes
#: ~10x slower than the tiny model on 1 thread of a 2-core CPU (~100-170 ms per step at batch 1):
#: 32 output tokens, so a request at concurrency 1 takes a few seconds and a level of --duration
#: s still completes some, and at most 16 requests per level (a level of more clients than
#: requests never has them all busy: it is cut), so its sweep takes ~3 minutes.
SWEEPS = {
    "smollm2-135m": {"output_len": 32, "max_requests": 16},
    "tiny": {"output_len": 64, "max_requests": None},
}


def run_level(url: str, args, sweep: dict, concurrency: int, duration: float) -> dict:
    """C closed-loop clients for ``duration`` s (and at most ``sweep["max_requests"]`` requests);
    the summary plus the issued/completed counts."""
    out = asyncio.run(run_load(url, sweep["model"], num_prompts=sweep["max_requests"] or 1_000_000,
                               max_concurrency=concurrency, duration=duration,
                               prompt_len=sweep["prompt_len"], output_len=sweep["output_len"],
                               seed=args.seed + concurrency, progress=False))
    return result_row(out, concurrency, duration)


def result_row(out: dict, concurrency: int, duration: float, name: str | None = None) -> dict:
    """A run_load output as a result row, printed as one line of the sweep table, or (``name``
    given) of the soak table, which also has a rejected column."""
    s = out["summary"]
    row = {"concurrency": concurrency, "duration_limit": duration, "issued": out["config"]["issued"],
           **s}
    lead = f"{concurrency:>5}" if name is None else f"{name:<8} {concurrency:>5}"
    rejected = "" if name is None else f" {s['rejected']:>7}"
    print(f"{lead} {row['issued']:>7} {s['completed']:>7} {s['failed']:>6}{rejected} "
          f"{s['request_throughput']:>7.2f} {s['output_throughput']:>9.1f} "
          f"{_ms(s['median_ttft_ms'])} {_ms(s['p99_ttft_ms'])} "
          f"{_ms(s['median_tpot_ms'])} {_ms(s['p99_tpot_ms'])}", flush=True)
    return row


def _ms(x: float | None) -> str:
    return f"{'-':>8}" if x is None else f"{x:>8.1f}"


SOAK_HEADER = (f"{'soak':<8} {'conc':>5} {'issued':>7} {'done':>7} {'failed':>6} {'reject':>7} "
               f"{'req/s':>7} {'out tok/s':>9} {'TTFTp50':>8} {'TTFTp99':>8} {'TPOTp50':>8} "
               f"{'TPOTp99':>8}  (ms)")


# ---------------------------------------------------------------- hostile requests

def hostile_kinds(model: str) -> dict[str, dict]:
    """Each kind of bad request: how to send it and the answer it must get.

    ``body``: bytes sent as is (or ``"big"`` / ``"big-chunked"`` for a 5 MiB body, or
    ``"drop"`` for a stream the client leaves); ``status``, ``param`` and ``code``: the expected
    error (``param``/``code`` None means JSON null)."""
    def body(**fields) -> bytes:
        return json.dumps({"model": model, "prompt": "hello world", "max_tokens": 4,
                           "stream": True, **fields}).encode()

    return {
        "seed_too_big": {"body": body(seed=SEED_MAX + 1), "status": 400, "param": "seed"},
        "seed_too_small": {"body": body(seed=SEED_MIN - 1), "status": 400, "param": "seed"},
        "seed_plus_n_overflows": {"body": body(seed=SEED_MAX, n=2), "status": 400, "param": "seed"},
        # json.dumps escapes the lone surrogate: the raw JSON carries the six bytes \ud800
        "unpaired_surrogate": {"body": body(prompt="hello \ud800 world"), "status": 400,
                               "param": "prompt"},
        "five_stop_strings": {"body": body(stop=["a", "b", "c", "d", "e"]), "status": 400,
                              "param": "stop"},
        # ~600 one-token words: over the tiny model's 512-token context, which only tokenizing
        # shows; the server sheds load before it tokenizes, so a full queue may answer 503
        "prompt_over_context": {"body": body(prompt=" ".join(["the"] * 600)), "status": 400,
                                "param": "prompt", "code": "context_length_exceeded",
                                "may_be_shed": True},
        "invalid_json": {"body": body()[:-7], "status": 400, "param": None},
        "body_5mib": {"body": "big", "status": 413, "param": None, "code": "request_too_large"},
        "body_5mib_chunked": {"body": "big-chunked", "status": 413, "param": None,
                              "code": "request_too_large"},
        "disconnect_mid_stream": {"body": "drop", "status": 200},
    }


def _complete(answer: bytes) -> bool:
    """Whether ``answer`` holds an HTTP response's head and its Content-Length of body."""
    head, sep, content = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is not None and len(content) >= int(length.group(1))


class Hostile:
    """The hostile clients' requests and what they got, by kind."""

    def __init__(self, url: str, model: str):
        self.endpoint = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.kinds = hostile_kinds(model)
        # one 5 MiB body, shared by every request that sends it (with Content-Length, or chunked)
        head = json.dumps({"model": model, "max_tokens": 4, "prompt": ""}).encode()[:-2]
        self.big = head + b"a" * (BIG_BODY_BYTES - len(head) - 2) + b'"}'
        self.stats = {k: {"sent": 0, "expected": 0, "rejected": 0, "unexpected": 0, "examples": []}
                      for k in self.kinds}

    async def _big_body(self, chunked: bool) -> tuple[int, bytes]:
        """POST the 5 MiB body (with Content-Length, or chunked) on a raw socket, reading the
        answer while the body goes out. The server answers 413 as soon as it knows and closes
        the connection, and the rest of the body then gets a reset: a client that reads only
        after sending everything (httpx, requests), or whose transport dies with its writes
        (asyncio streams), mostly sees that reset instead of the answer, which a socket read
        still returns. Returns (status, body)."""
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.endpoint)
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(self.big)}"
        head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: "
                f"application/json\r\n{framing}\r\n\r\n").encode()
        sock = socket.socket(socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET)
        sock.setblocking(False)

        async def send_body() -> None:
            await loop.sock_sendall(sock, head)
            view = memoryview(self.big)
            for i in range(0, len(view), 2**16):
                piece = view[i:i + 2**16]
                if chunked:
                    await loop.sock_sendall(sock, b"%x\r\n" % len(piece))
                await loop.sock_sendall(sock, piece)
                if chunked:
                    await loop.sock_sendall(sock, b"\r\n")
            if chunked:
                await loop.sock_sendall(sock, b"0\r\n\r\n")

        answer, sender = b"", None
        try:
            await loop.sock_connect(sock, (parts.hostname, parts.port))
            sender = asyncio.create_task(send_body())
            deadline = time.perf_counter() + 60
            while not _complete(answer):
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 2**16),
                                                  max(0.0, deadline - time.perf_counter()))
                except ConnectionResetError:
                    if answer:
                        break
                    raise ConnectionResetError("connection reset before any answer") from None
                if not data:
                    break
                answer += data
        finally:
            if sender is not None:  # the server stops reading once it has answered
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            sock.close()
        if not _complete(answer):
            raise ConnectionError(f"incomplete answer: {answer[:200]!r}")
        head_bytes, _, content = answer.partition(b"\r\n\r\n")
        return int(head_bytes.split(b" ", 2)[1]), content

    async def send(self, client, kind: str) -> float | None:
        """One request of ``kind``; records its outcome; returns a Retry-After to honour."""
        spec, stat = self.kinds[kind], self.stats[kind]
        stat["sent"] += 1
        headers = {"Content-Type": "application/json"}
        try:
            if spec["body"] == "drop":
                problem, retry = await self._drop(client, headers)
            elif spec["body"] in ("big", "big-chunked"):
                answer = await self._big_body(chunked=spec["body"] == "big-chunked")
                problem, retry = self._check(spec, *answer), None
            else:
                response = await client.post(self.endpoint, content=spec["body"], headers=headers)
                retry = (parse_retry_after(response.headers.get("retry-after"))
                         if spec.get("may_be_shed") and response.status_code == 503 else None)
                problem = None if retry is not None else self._check(
                    spec, response.status_code, response.content)
        except Exception as exc:  # noqa: BLE001 - a broken connection is an unexpected answer
            problem, retry = f"{type(exc).__name__}: {exc or 'no message'}"[:200], None
        if retry is not None:
            stat["rejected"] += 1
        elif problem is None:
            stat["expected"] += 1
        else:
            stat["unexpected"] += 1
            if len(stat["examples"]) < 5:
                stat["examples"].append(problem)
        return retry

    @staticmethod
    def _check(spec: dict, status: int, content: bytes) -> str | None:
        """None if the answer is the expected error, else what is wrong with it."""
        text = content[:300].decode(errors="replace")
        if status != spec["status"]:
            return f"HTTP {status} (expected {spec['status']}): {text}"
        try:
            error = json.loads(content)["error"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without OpenAI's error JSON: {text}"
        if not isinstance(error, dict) or set(error) != ERROR_KEYS:
            return f"HTTP {status}: error keys are not message/type/param/code: {text}"
        if error["type"] != spec.get("type", "invalid_request_error") or not error["message"]:
            return f"HTTP {status}: unexpected error type or empty message: {text}"
        if error["param"] != spec.get("param") or error["code"] != spec.get("code"):
            return (f"HTTP {status}: param {error['param']!r}, code {error['code']!r} (expected "
                    f"{spec.get('param')!r}, {spec.get('code')!r}): {text}")
        return None

    async def _drop(self, client, headers: dict) -> tuple[str | None, float | None]:
        """A stream the client leaves after a few chunks: a 200 that streams (or a 503 +
        Retry-After: the queue was full) is expected; the server must then free it."""
        payload = {"model": self.model, "prompt": "the quick brown fox", "max_tokens": 200,
                   "ignore_eos": True, "stream": True}
        async with client.stream("POST", self.endpoint, json=payload, headers=headers) as response:
            if response.status_code != 200:
                content = await response.aread()
                retry = parse_retry_after(response.headers.get("retry-after"))
                if response.status_code == 503 and retry is not None:  # the queue is full
                    problem = self._check({"status": 503, "type": "service_unavailable_error",
                                           "code": "queue_full"}, 503, content)
                    return (None, retry) if problem is None else (problem, None)
                return f"HTTP {response.status_code} (expected 200): {content[:200]!r}", None
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return f"the stream ended after {chunks} chunk(s), before the client left", None
                if "error" in json.loads(data):
                    return f"error chunk: {data[:200]}", None
                chunks += 1
                if chunks >= DROP_AFTER_CHUNKS:
                    return None, None  # leaving the block closes the connection mid-stream
            return f"the stream ended without [DONE] after {chunks} chunk(s)", None


async def hostile_soak(url: str, args, concurrency: int, duration: float) -> tuple[dict, dict]:
    """The soak's closed-loop load plus ``args.hostile_clients`` hostile clients, for
    ``duration`` s; returns (run_load's output, the hostile requests' counts by kind)."""
    import httpx

    hostile = Hostile(url, args.soak_model)
    kinds = list(hostile.kinds)
    t0 = time.perf_counter()

    async def client_loop(client, k: int) -> None:
        i = k  # each client starts at its own kind, so every kind is in flight at some point
        while time.perf_counter() - t0 < duration:
            retry = await hostile.send(client, kinds[i % len(kinds)])
            i += 1
            wait = args.hostile_pause if retry is None else max(args.hostile_pause,
                                                                min(retry, RETRY_AFTER_CAP))
            await asyncio.sleep(max(0.0, min(wait, t0 + duration - time.perf_counter())))

    async def hostile_clients() -> None:
        async with httpx.AsyncClient(timeout=60.0) as client:
            await asyncio.gather(*(client_loop(client, k) for k in range(args.hostile_clients)))

    load = run_load(url, args.soak_model, num_prompts=1_000_000, max_concurrency=concurrency,
                    duration=duration, prompt_len=args.prompt_len, output_len=args.soak_output_len,
                    seed=args.seed + concurrency + 1, progress=False)
    out, _ = await asyncio.gather(load, hostile_clients())
    return out, hostile.stats


# ---------------------------------------------------------------- the server afterwards

def metric_values(text: str, name: str) -> list[float]:
    """Every sample of ``name`` in a Prometheus text exposition."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)", re.M)
    return [float(v) for v in pattern.findall(text)]


def idle_check(url: str, timeout: float = 10.0) -> dict:
    """Poll ``/metrics`` until nothing runs and the KV cache is empty (up to ``timeout`` s), then
    ``/health``; what was seen last."""
    import httpx

    start = time.perf_counter()
    seen: dict = {}
    while True:
        try:
            text = httpx.get(url + "/metrics", timeout=5.0).text
            seen = {name: metric_values(text, name) for name in
                    ("vllm:num_requests_running", "vllm:num_requests_waiting",
                     "vllm:kv_cache_usage_perc")}
            seen["finished_by_reason"] = dict(re.findall(
                r'^vllm:request_success_total{[^}]*finished_reason="(\w+)"[^}]*}\s+(\S+)', text, re.M))
            idle = all(seen[n] and all(v == 0 for v in seen[n])
                       for n in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"))
        except httpx.HTTPError as exc:
            seen, idle = {"error": f"{type(exc).__name__}: {exc}"}, False
        if idle or time.perf_counter() - start >= timeout:
            break
        time.sleep(0.25)
    try:
        health = httpx.get(url + "/health", timeout=5.0).status_code
    except httpx.HTTPError as exc:
        health = f"{type(exc).__name__}: {exc}"
    return {"idle": idle, "waited_s": round(time.perf_counter() - start, 2), "metrics": seen,
            "health": health, "passed": idle and health == 200}


def server_log_problems(server: ServerProcess | None, limit: int = 10) -> list[str]:
    """Lines of the server's log that report errors (ERROR, CRITICAL, tracebacks)."""
    if server is None:
        return []
    server.log.flush()
    with open(server.log.name, errors="replace") as f:
        lines = [line.rstrip() for line in f
                 if line.startswith(("ERROR", "CRITICAL")) or line.startswith("Traceback")]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def run_soaks(url: str, args, server: ServerProcess | None) -> dict:
    """The plain soak, then the hostile one, against ``url``; rows, hostile counts, checks."""
    c, d = args.soak_concurrency, args.soak_duration
    print(f"soak: {c} closed-loop streaming clients for {d:g} s, then again with "
          f"{args.hostile_clients} hostile clients", flush=True)
    print(SOAK_HEADER, flush=True)
    soak = result_row(asyncio.run(run_load(
        url, args.soak_model, num_prompts=1_000_000, max_concurrency=c, duration=d,
        prompt_len=args.prompt_len, output_len=args.soak_output_len, seed=args.seed + c,
        progress=False)), c, d, "plain")
    soak["after"] = idle_check(url)
    out, kinds = asyncio.run(hostile_soak(url, args, c, d))
    hostile = result_row(out, c, d, "hostile")
    hostile["after"] = idle_check(url)
    print(f"{'hostile request':<24} {'sent':>6} {'expected':>9} {'503+RA':>7} {'unexpected':>10}")
    for kind, st in kinds.items():
        print(f"{kind:<24} {st['sent']:>6} {st['expected']:>9} {st['rejected']:>7} "
              f"{st['unexpected']:>10}" + "".join(f"\n       {e}" for e in st["examples"]))
    for name, row in (("plain", soak), ("hostile", hostile)):
        a = row["after"]
        print(f"after the {name} soak: /metrics {a['metrics']} (waited {a['waited_s']} s), "
              f"/health {a['health']}")
    return {"soak": soak, "hostile_soak": {**hostile, "hostile_requests": kinds,
                                            "hostile_clients": args.hostile_clients},
            "server_alive": server is None or server.proc.poll() is None,
            "server_log_problems": server_log_problems(server)}


def plot(result: dict, out: Path) -> None:
    """One row per model: output tokens/s, and TTFT and TPOT p50/p99, against concurrency."""
    plt = viz.script_pyplot()
    if plt is None:
        return
    sweeps = [sw for sw in result["models"] if sw["levels"]]
    fig, grid = plt.subplots(len(sweeps), 2, figsize=(10, 3.8 * len(sweeps)), squeeze=False)
    for axes, sw in zip(grid, sweeps, strict=True):
        rows = sw["levels"]
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["output_throughput"] for r in rows], "o-", color="#2a7ab9")
        axes[0].set_ylim(bottom=0)
        ratio = sw["c8_over_c1_output_throughput"]
        axes[0].set_title(f"{sw['model']}: output tokens/s (higher is better)"
                          + (f"\nc=8 / c=1 {ratio:.2f}x (means of alternating runs)" if ratio else ""),
                          fontsize=9)
        for key, color in (("ttft", "#c9a227"), ("tpot", "#2a7ab9")):
            for stat, style in (("median", "o-"), ("p99", "s--")):
                ys = [r[f"{stat}_{key}_ms"] for r in rows]
                axes[1].plot(c, [float("nan") if y is None else y for y in ys], style, color=color,
                             label=f"{key.upper()} {'p50' if stat == 'median' else stat}")
        axes[1].set_ylim(bottom=0)
        axes[1].set_title(f"{sw['model']}: latency, ms (lower is better)\nprompt {sw['prompt_len']} "
                          f"words, output {sw['output_len']} tokens", fontsize=9)
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(c, [str(x) for x in c])
            ax.set_xlabel("concurrent streaming clients")
    s = result["settings"]
    fig.suptitle(f"course_lib serve, {s['threads']} server thread(s), {s['duration']:g} s per level "
                 f"({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def run_sweep(sweep: dict, args, start_server) -> dict:
    """One model's concurrency sweep and its 8-vs-1 ratio, on its own server."""
    model, levels = sweep["model"], sweep["concurrency"]
    print(f"\n=== {model}: concurrency {levels}, {args.duration:g} s per level"
          + (f", at most {sweep['max_requests']} requests per level" if sweep["max_requests"] else "")
          + (f" (cut: {sweep['cut']}, above the requests per level)" if sweep["cut"] else "")
          + f"; prompts of {sweep['prompt_len']} words, {sweep['output_len']} output tokens", flush=True)
    start = time.perf_counter()
    server, rows, repeats = None, [], []
    try:
        url, server = start_server(model, args.max_queue)
        print(f"{'conc':>5} {'issued':>7} {'done':>7} {'failed':>6} {'req/s':>7} {'out tok/s':>9} "
              f"{'TTFTp50':>8} {'TTFTp99':>8} {'TPOTp50':>8} {'TPOTp99':>8}  (ms)", flush=True)
        rows = [run_level(url, args, sweep, c, args.duration) for c in levels]
        # The ratio compares runs a minute apart, and this VM's speed drifts by up to ~30% over
        # minutes: measure concurrency 1 and 8 again, alternating, and compare the means.
        if 1 in levels and 8 in levels:
            repeats = [run_level(url, args, sweep, c, args.duration)
                       for _ in range(args.ratio_repeats) for c in (1, 8)]
    finally:
        if server is not None:
            server.stop()
    by_c = {r["concurrency"]: r for r in rows}
    ratio, passed = None, False
    if 1 in by_c and 8 in by_c:
        runs = {c: [r["output_throughput"] for r in [by_c[c], *repeats] if r["concurrency"] == c]
                for c in (1, 8)}
        mean = {c: statistics.mean(v) for c, v in runs.items()}
        ratio = mean[8] / mean[1]
        passed = ratio >= TARGET_RATIO
        line = (f"[{'PASS' if passed else 'FAIL'}] {model}: output tokens/s at concurrency 8 / at 1 = "
                f"{mean[8]:.1f} / {mean[1]:.1f} = {ratio:.2f}x (target >= {TARGET_RATIO:g}x; means "
                f"of {len(runs[1])} runs each, alternating: c=1 {[round(x, 1) for x in runs[1]]}, "
                f"c=8 {[round(x, 1) for x in runs[8]]})")
    else:
        line = (f"[FAIL] {model}: concurrency 1 and 8 must both be swept (in --concurrency and "
                f"within --max-requests) to measure the ratio")
    print(line, flush=True)
    seconds = time.perf_counter() - start
    print(f"{model}: sweep {seconds:.0f} s", flush=True)
    return {"levels": rows, "ratio_repeats": repeats, "c8_over_c1_output_throughput": ratio,
            "scaling_passed": passed, "scaling_line": line, "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"],
                        help="models swept, each on its own server; the first is the headline "
                             "(default: %(default)s)")
    parser.add_argument("--soak-model", default="tiny", help="the soaks' server model")
    parser.add_argument("--soaks-from", type=Path, default=None,
                        help="with --only sweep: copy the soaks from this earlier full result "
                             "(recorded as such) and write a full result (serve-<machine>.json)")
    parser.add_argument("--only", choices=("sweep", "soak"), default=None,
                        help="run only the sweep (and 8-vs-1 ratio) or only the soaks; the result "
                             "goes to results/serve_{sweep,soak}-<machine>.json")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="levels (a level above a model's --max-requests is cut)")
    parser.add_argument("--max-requests", type=int, default=None,
                        help="requests per level at most (default: per model, see SWEEPS)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--ratio-repeats", type=int, default=2,
                        help="extra alternating runs at concurrency 1 and 8 for the ratio")
    parser.add_argument("--soak-concurrency", type=int, default=128)
    parser.add_argument("--soak-duration", type=float, default=60.0)
    parser.add_argument("--soak-max-queue", type=int, default=8,
                        help="--max-queue of the soak's own server (default: %(default)s)")
    parser.add_argument("--hostile-clients", type=int, default=8,
                        help="closed-loop clients sending bad requests in the hostile soak")
    parser.add_argument("--hostile-pause", type=float, default=0.05,
                        help="seconds a hostile client waits between requests")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=None,
                        help=f"output tokens (default: per model in the sweep, see SWEEPS; "
                             f"{SOAK_OUTPUT_LEN} in the soaks)")
    parser.add_argument("--threads", type=int, default=None,
                        help="server's torch threads (default: runtime.cpu_threads, shared: 1 on 2 cores)")
    parser.add_argument("--max-queue", type=int, default=256, help="--max-queue of the sweep's server")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for `course_lib serve` (repeatable)")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--url", default=None, help="load this running server instead of starting one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="levels 1 2 4 8, 3 s each; soaks of 32 clients, 10 s each")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a check fails")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    args.threads = runtime.cpu_threads(args.threads, shared=True)  # the load generator needs a core
    if args.quick:
        args.concurrency, args.duration, args.soak_duration = [1, 2, 4, 8], 3.0, 10.0
        args.ratio_repeats = 1
        args.soak_concurrency = min(args.soak_concurrency, 32)
    if args.soaks_from is not None and args.only != "sweep":
        parser.error("--soaks-from goes with --only sweep")
    args.soak_output_len = args.output_len or SOAK_OUTPUT_LEN
    if args.url:
        args.models = args.models[:1]  # the model the running server serves
    sweeps = []
    for model in args.models:
        sweep = {"model": model, "prompt_len": args.prompt_len, **SWEEPS.get(model, SWEEPS["tiny"])}
        if args.output_len is not None:
            sweep["output_len"] = args.output_len
        if args.max_requests is not None:
            sweep["max_requests"] = args.max_requests
        cap = sweep["max_requests"]
        sweep["concurrency"] = sorted(c for c in set(args.concurrency) if cap is None or c <= cap)
        sweep["cut"] = sorted(c for c in set(args.concurrency) if cap is not None and c > cap)
        sweeps.append(sweep)
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as exc:
            parser.error(str(exc))

    def start_server(model: str, max_queue: int) -> tuple[str, ServerProcess | None]:
        if args.url:
            return args.url, None
        server = ServerProcess("--model", model, "--max-queue", str(max_queue),
                               *args.server_arg, threads=args.threads,
                               startup_timeout=args.startup_timeout)
        print(f"starting: OMP_NUM_THREADS={args.threads} course_lib serve {' '.join(server.args)}",
              flush=True)
        try:
            url = server.start().url
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"error: {exc}") from None
        print(f"server at {url}; warming up ...", flush=True)
        asyncio.run(run_load(url, model, num_prompts=4, max_concurrency=4, prompt_len=8,
                             output_len=8, progress=False))
        return url, server

    if args.only != "soak":
        for sweep in sweeps:
            sweep.update(run_sweep(sweep, args, start_server))
    soaks = None
    if args.soaks_from is not None:
        earlier = json.loads(args.soaks_from.read_text())
        if not earlier.get("soak"):
            raise SystemExit(f"--soaks-from {args.soaks_from}: no soak results in it")
        soaks = {"soak": earlier["soak"], "hostile_soak": earlier["hostile_soak"],
                 **(earlier.get("soak_server") or {})}
        print(f"soaks: not run; copied from {args.soaks_from} (an earlier run)", flush=True)
    if args.only != "sweep":
        server = None
        try:  # its own server, with a small waiting queue: most clients are turned away
            url, server = start_server(args.soak_model, args.soak_max_queue)
            soaks = run_soaks(url, args, server)
        finally:
            if server is not None:
                soaks_exit = server.stop()
                if soaks is not None:
                    soaks["server_exit_code"] = soaks_exit

    checks = {}
    if soaks is not None:
        soak, hostile = soaks["soak"], soaks["hostile_soak"]
        what = (f"{args.soak_concurrency} concurrent streaming clients for {args.soak_duration:g} s"
                f"{'' if args.url else f', --max-queue {args.soak_max_queue}'}")
        checks["soak"] = soak["failed"] == 0 and soak["completed"] > 0
        print(f"[{'PASS' if checks['soak'] else 'FAIL'}] soak, {what}: {soak['completed']} "
              f"completed, {soak['failed']} failed, {soak['rejected']} rejected (503 + Retry-After)"
              + "".join(f"\n       error: {e}" for e in soak["errors"]))
        kinds = hostile["hostile_requests"]
        bad = {k: st for k, st in kinds.items() if st["unexpected"] or not st["expected"]}
        after = hostile["after"]
        checks["hostile_soak"] = (hostile["failed"] == 0 and hostile["completed"] > 0 and not bad
                                  and after["passed"] and soaks["server_alive"])
        print(f"[{'PASS' if checks['hostile_soak'] else 'FAIL'}] hostile soak, {what} + "
              f"{args.hostile_clients} hostile clients: {hostile['completed']} completed, "
              f"{hostile['failed']} failed, {hostile['rejected']} rejected; hostile requests "
              f"{sum(st['expected'] for st in kinds.values())}/{sum(st['sent'] for st in kinds.values())}"
              f" answered as expected and {sum(st['rejected'] for st in kinds.values())} "
              f"shed with 503 + Retry-After (streams to drop, and prompts only tokenizing "
              f"shows too long: the server sheds before it tokenizes); "
              f"{'no kind missing' if not bad else 'wrong or never checked: ' + ', '.join(bad)}; "
              f"afterwards running {after['metrics'].get('vllm:num_requests_running')}, KV usage "
              f"{after['metrics'].get('vllm:kv_cache_usage_perc')}, /health {after['health']}"
              + ("" if soaks["server_alive"] else "; THE SERVER DIED")
              + "".join(f"\n       error: {e}" for e in hostile["errors"]))
        for line in soaks["server_log_problems"]:
            print(f"       server log: {line}")
    if args.only != "soak":
        for sweep in sweeps:
            checks[f"scaling_{sweep['model']}"] = sweep["scaling_passed"]
            print(sweep["scaling_line"])
        for sweep in sweeps:
            del sweep["scaling_line"]
    headline = sweeps[0] if args.only != "soak" else {}

    result = {
        "benchmark": "serve",
        "claim": (f"{args.soak_concurrency} concurrent streaming clients for {args.soak_duration:g} s "
                  f"against --max-queue {args.soak_max_queue}: zero failed requests (503 + "
                  f"Retry-After rejections allowed), also with hostile requests mixed in, each "
                  f"answered as expected, and the server idle and healthy afterwards; output "
                  f"tokens/s at concurrency 8 >= {TARGET_RATIO:g}x at 1"),
        "machine": runtime.machine_description(), "device": str(runtime.get_device()),
        "settings": {**vars(args), "out": str(args.out) if args.out else None,
                     "soaks_from": str(args.soaks_from) if args.soaks_from else None,
                     "server": None if args.url else "python -m course_lib serve"},
        # the headline model's sweep at the top level too (what older readers expect)
        "headline_model": headline.get("model"), "levels": headline.get("levels", []),
        "ratio_repeats": headline.get("ratio_repeats", []),
        "c8_over_c1_output_throughput": headline.get("c8_over_c1_output_throughput"),
        "scaling_passed": headline.get("scaling_passed"),
        "models": sweeps if args.only != "soak" else [],
        "soaks_from": (f"{args.soaks_from.name}: not run here, copied from an earlier run"
                       if args.soaks_from else None),
        "soak": soaks and soaks["soak"], "hostile_soak": soaks and soaks["hostile_soak"],
        "soak_server": soaks and {k: soaks.get(k) for k in ("server_alive", "server_exit_code",
                                                             "server_log_problems")},
        "soak_passed": checks.get("soak"), "hostile_soak_passed": checks.get("hostile_soak"),
        "checks": checks, "target_met": bool(checks) and all(checks.values()),
    }
    # a partial run goes beside the full result (serve_soak-<machine>.json: not a "serve"
    # result the summary reads), never over it
    full = args.only is None or args.soaks_from is not None
    out = runtime.write_result("serve" if full else f"serve_{args.only}", result, RESULTS, args.out)
    if any(sw.get("levels") for sw in result["models"]):
        plot(result, out.with_suffix(".png"))
    return 0 if result["target_met"] or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
