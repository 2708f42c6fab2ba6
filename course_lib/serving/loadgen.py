"""A load generator for OpenAI-compatible servers, after vLLM's ``benchmarks/benchmark_serving.py``.

It sends streaming ``POST /v1/completions`` requests on an arrival schedule (Poisson, or gamma
for burstier traffic), optionally with at most ``max_concurrency`` in flight, and times every
chunk of every stream. From those times it computes the serving metrics the course uses:

- **TTFT** (time to first token): first chunk with text - request start (queueing + prefill);
- **ITL** (inter-token latency): the gaps between successive chunks with text;
- **TPOT** (time per output token): (E2E - TTFT) / (n - 1), the decode speed one user sees;
- **E2E**: last byte - request start;
- **throughput** (requests/s, output tokens/s) and **goodput**: requests per second that met
  every service-level objective (SLO), e.g. TTFT <= 500 ms and TPOT <= 50 ms.

A 503 that carries ``Retry-After`` is the server shedding load as it should (its queue is
full): it is counted as **rejected**, not failed, and in closed-loop mode (``max_concurrency``)
that client waits the Retry-After seconds (at most ``retry_after_cap``) before its next request.
Anything else that is not a complete stream (another status, a 503 without Retry-After, an
error chunk, no ``data: [DONE]``, a broken connection) is a **failure**.

It only talks to servers on this machine (:func:`check_loopback`): it is a course tool, and a
load test against someone else's server is an attack on it.

    course-lib bench serve --num-prompts 64 --max-concurrency 8 --goodput ttft:500 tpot:50
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import ipaddress
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2e")
#: Longest wait (s) a closed-loop client honours after a 503 + Retry-After.
RETRY_AFTER_CAP = 2.0
# Words that are one token each for GPT-2-style BPE tokenizers (with a leading space), so a
# prompt of n words is about n tokens; the server's usage chunk reports the exact count.
WORDS = ("self return def import if else for in None True False class value name data result "
         "args kwargs list dict str int the and of to is not with as from try except raise while "
         "yield lambda key path file line text index count size type object print len range "
         "append get set items").split()


@dataclass
class RequestResult:
    """One request's outcome and the perf_counter times of its stream."""

    success: bool = False
    prompt_tokens: int = 0  # from the usage chunk (0 when the server sent none)
    output_tokens: int = 0  # from the usage chunk, else the number of chunks with text
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)  # each chunk that carried new text
    end: float = 0.0
    error: str | None = None
    rejected: bool = False  # a 503 with Retry-After: the server shed it (not a failure)
    retry_after: float | None = None  # the seconds it asked for

    def metrics(self) -> dict | None:
        """:func:`latency_metrics` of a successful request with text, else None."""
        if not self.success or not self.token_times:
            return None
        return latency_metrics(self.start, self.token_times, self.end, self.output_tokens)


def latency_metrics(start: float, token_times: list[float], end: float,
                    output_tokens: int | None = None) -> dict:
    """TTFT, E2E, ITLs and TPOT (seconds) of one request, as vLLM's benchmark defines them.

    TPOT = (E2E - TTFT) / (n - 1) with n = ``output_tokens`` (a chunk may carry several tokens)
    or the number of chunks; None when n <= 1 (one token has no decode phase).
    """
    if not token_times:
        raise ValueError("token_times is empty: a request needs at least one token to have a TTFT")
    times = [start, *token_times, end]
    if any(b < a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError("times must be ordered: start <= token_times[0] <= ... <= "
                         f"token_times[-1] <= end; got start={start}, token_times={token_times}, "
                         f"end={end}")
    ttft, e2e = token_times[0] - start, end - start
    n = output_tokens or len(token_times)
    return {"ttft": ttft, "e2e": e2e,
            "itl": [b - a for a, b in zip(token_times, token_times[1:], strict=False)],
            "tpot": (e2e - ttft) / (n - 1) if n > 1 else None}


def parse_slos(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds, vLLM's ``--goodput``) -> seconds by key."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = "e2e" if key.strip() == "e2el" else key.strip()  # vLLM spells it e2el
        try:
            ms = float(value) if sep else math.nan
        except ValueError:
            ms = math.nan
        if key not in SLO_KEYS or not (math.isfinite(ms) and ms > 0) or key in slos:
            reason = ("repeats a key" if key in slos else f"key must be one of {', '.join(SLO_KEYS)}"
                      if key not in SLO_KEYS else "value must be a number of milliseconds > 0")
            raise ValueError(f"bad SLO {item!r}: {reason}; expected KEY:MS, e.g. ttft:500 tpot:50 "
                             f"e2e:2000 (allowed keys: {', '.join(SLO_KEYS)})")
        slos[key] = ms / 1000
    return slos


def meets_slos(metrics: dict, slos: dict) -> bool:
    """True when every SLO holds (seconds); a request without a TPOT (one token) meets a TPOT SLO."""
    return all((key == "tpot" and metrics[key] is None) or metrics[key] <= limit
               for key, limit in slos.items())


def _stats(name: str, values: list[float]) -> dict:
    """mean/median/std/p99 of seconds, in milliseconds under vLLM's key names (None if empty)."""
    ms = np.asarray(values, dtype=float) * 1000
    stats = {"mean": np.mean, "median": np.median, "std": np.std,
             "p99": lambda x: np.percentile(x, 99)}
    return {f"{s}_{name}_ms": float(f(ms)) if ms.size else None for s, f in stats.items()}


def summarize(results: list[RequestResult], duration: float, slos: dict | None = None) -> dict:
    """Counts, throughputs, goodput and latency statistics (ms) of a run that took ``duration`` s."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    ok = [r for r in results if r.success]
    rejected = [r for r in results if not r.success and r.rejected]
    failed = [r for r in results if not r.success and not r.rejected]
    metrics = [m for m in (r.metrics() for r in ok) if m is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    errors = list(dict.fromkeys(r.error for r in failed))
    summary = {
        "completed": len(ok), "failed": len(failed), "rejected": len(rejected), "errors": errors[:5],
        "duration": duration, "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": len(ok) / duration, "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
    }
    if slos:
        summary["goodput"] = sum(meets_slos(m, slos) for m in metrics) / duration
        summary["slos_ms"] = {k: v * 1000 for k, v in slos.items()}
    summary |= _stats("ttft", [m["ttft"] for m in metrics])
    summary |= _stats("tpot", [m["tpot"] for m in metrics if m["tpot"] is not None])
    summary |= _stats("itl", [x for m in metrics for x in m["itl"]])
    summary |= _stats("e2el", [m["e2e"] for m in metrics])
    return summary


def arrival_intervals(n: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> list[float]:
    """Gaps (s) between request i and i + 1: gamma(shape=burstiness, mean=1/rate), 0 for rate inf.

    burstiness 1 is a Poisson process; < 1 burstier, > 1 more regular, same mean rate.
    """
    if n < 0 or not request_rate > 0 or not burstiness > 0:
        raise ValueError(f"need n >= 0, request_rate > 0 and burstiness > 0; got n={n}, "
                         f"request_rate={request_rate}, burstiness={burstiness}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1 / (request_rate * burstiness), size=n).tolist()


def check_loopback(url: str) -> None:
    """Raise ValueError unless ``url`` is http(s) on this machine (localhost, 127.0.0.0/8, ::1)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(f"refusing to load {url!r}: this course tool only sends load to a server "
                         "on this machine (http://127.0.0.1:PORT, http://localhost:PORT or "
                         "http://[::1]:PORT)")


def random_prompt(rng: np.random.Generator, prompt_len: int) -> str:
    """``prompt_len`` random words: prompts share no prefix, so prefix caching cannot help."""
    return " ".join(rng.choice(WORDS, size=prompt_len))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent or
    not valid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


async def _send(client, endpoint: str, payload: dict, headers: dict) -> RequestResult:
    """One streaming request; every failure is recorded in the result, never raised."""
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", endpoint, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                try:
                    body = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                result.error = f"HTTP {response.status_code}: {str(body)[:200]}"
                if response.status_code == 503:
                    result.retry_after = parse_retry_after(response.headers.get("retry-after"))
                    result.rejected = result.retry_after is not None
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == "[DONE]":
                    result.success = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error in stream: {chunk['error'].get('message', chunk['error'])}"
                    return result
                if any(c.get("text") for c in chunk.get("choices") or []):
                    result.token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
            if not result.success:
                result.error = "stream ended without data: [DONE]"
            elif not result.output_tokens:
                result.output_tokens = len(result.token_times)
    except Exception as exc:  # connection refused, timeout, bad JSON...: a failed request
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.end = time.perf_counter()
    return result


async def run_load(url: str, model: str, *, num_prompts: int, request_rate: float = float("inf"),
                   burstiness: float = 1.0, max_concurrency: int | None = None,
                   duration: float | None = None, prompt_len: int = 32, output_len: int = 32,
                   seed: int = 0, api_key: str | None = None, progress: bool = True,
                   timeout: float = 300.0, slos: dict[str, float] | None = None,
                   retry_after_cap: float = RETRY_AFTER_CAP) -> dict:
    """Send up to ``num_prompts`` streaming requests (for at most ``duration`` s); measure them.

    Requests start on the arrival schedule; with ``max_concurrency`` one waits for a free slot.
    No new request starts after ``duration`` seconds; those in flight are waited for. With
    ``max_concurrency`` (a closed loop of clients), a client whose request was rejected (503 +
    Retry-After) keeps its slot for the Retry-After seconds, at most ``retry_after_cap`` and
    never past ``duration``, before it sends again.
    Returns ``{"config", "summary", "requests"}`` (see :func:`summarize`; goodput under ``slos``,
    in seconds as :func:`parse_slos` returns them).
    """
    import httpx
    from tqdm.auto import tqdm

    check_loopback(url)
    for name, value in (("num_prompts", num_prompts), ("prompt_len", prompt_len),
                        ("output_len", output_len), ("max_concurrency", max_concurrency or 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if not retry_after_cap >= 0:
        raise ValueError(f"retry_after_cap must be >= 0 seconds, got {retry_after_cap}")
    gaps = arrival_intervals(num_prompts, request_rate, burstiness, seed)
    rng = np.random.default_rng([seed, 1])  # prompts: a stream apart from the arrivals'
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])  # request 0 leaves at t = 0
    endpoint = url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=num_prompts, disable=not progress, desc="requests", unit="req")

    tasks = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_concurrency or 100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(payload: dict) -> RequestResult:
            try:
                result = await _send(client, endpoint, payload, headers)
                if slots and result.rejected:  # this client backs off before its next request
                    wait = min(result.retry_after, retry_after_cap)
                    if duration is not None:
                        wait = min(wait, t0 + duration - time.perf_counter())
                    if wait > 0:
                        await asyncio.sleep(wait)
                return result
            finally:
                if slots:
                    slots.release()
                bar.update(1)

        t0 = time.perf_counter()
        for i in range(num_prompts):
            if duration is not None and arrivals[i] >= duration:
                break
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            if slots:
                await slots.acquire()
            if duration is not None and time.perf_counter() - t0 >= duration:
                if slots:
                    slots.release()
                break
            payload = {"model": model, "prompt": random_prompt(rng, prompt_len), "max_tokens": output_len,
                       "ignore_eos": True, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(one(payload)))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    bar.close()
    config = {"url": url, "model": model, "num_prompts": num_prompts, "issued": len(tasks),
              "request_rate": "inf" if math.isinf(request_rate) else request_rate,
              "burstiness": burstiness, "max_concurrency": max_concurrency, "duration": duration,
              "prompt_len": prompt_len, "output_len": output_len, "seed": seed,
              "retry_after_cap": retry_after_cap}
    requests = []
    for r in results:
        m = r.metrics() or {"ttft": None, "tpot": None, "itl": None}
        requests.append({"success": r.success, "rejected": r.rejected, "prompt_tokens": r.prompt_tokens,
                         "output_tokens": r.output_tokens, "start": r.start - t0,
                         "ttft": m["ttft"], "tpot": m["tpot"], "e2e": r.end - r.start,
                         "itl": m["itl"], "error": r.error})
    return {"config": config, "summary": summarize(list(results), elapsed, slos),
            "requests": requests}


def format_summary(summary: dict, title: str = "Serving Benchmark Result") -> str:
    """The summary as vLLM's benchmark prints it (latencies in ms; '-' where there is no data)."""
    def row(label: str, value, fmt: str = ".2f") -> str:
        text = "-" if value is None else format(value, fmt)
        return f"{label:<40}{text:>10}"

    lines = [f"{title:=^50}", row("Successful requests:", summary["completed"], "d"),
             row("Failed requests:", summary["failed"], "d")]
    if summary.get("rejected"):
        lines.append(row("Rejected requests (503 + Retry-After):", summary["rejected"], "d"))
    lines += [row("Benchmark duration (s):", summary["duration"]),
              row("Total input tokens:", summary["total_input_tokens"], "d"),
              row("Total generated tokens:", summary["total_output_tokens"], "d"),
              row("Request throughput (req/s):", summary["request_throughput"])]
    if "goodput" in summary:
        lines.append(row("Request goodput (req/s):", summary["goodput"]))
    lines += [row("Output token throughput (tok/s):", summary["output_throughput"]),
              row("Total token throughput (tok/s):", summary["total_token_throughput"])]
    for key, name, header in (("ttft", "TTFT", "Time to First Token"),
                              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                              ("itl", "ITL", "Inter-token Latency"),
                              ("e2el", "E2EL", "End-to-end Latency")):
        lines.append(f"{header:-^50}")
        lines += [row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {name} (ms):",
                      summary[f"{stat}_{key}_ms"]) for stat in ("mean", "median", "p99")]
    lines += ["=" * 50] + [f"error: {e}" for e in summary["errors"]]
    return "\n".join(lines)


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``course-lib bench serve`` (vLLM's names where it has them)."""
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="server base URL, on this machine only (default: %(default)s)")
    parser.add_argument("--model", default="tiny", help="model name sent in each request")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests to send at most")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="mean requests/s (default inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight at once (default: no limit)")
    parser.add_argument("--duration", type=float, default=None,
                        help="start no new request after this many seconds")
    parser.add_argument("--prompt-len", type=int, default=32, help="words per prompt (~tokens)")
    parser.add_argument("--output-len", type=int, default=32, help="max_tokens (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs in ms for goodput, e.g. ttft:500 tpot:50 e2e:2000")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--out", type=Path, default=None, help="write the full results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def bench_serve_cli(args: argparse.Namespace) -> int:
    """Run :func:`run_load` from parsed arguments; 0 if no request failed (a rejection, 503 +
    Retry-After, is not a failure), 1 if one did, 2 on bad input."""
    try:
        slos = parse_slos(args.goodput) if args.goodput else None
        result = asyncio.run(run_load(
            args.url, args.model, num_prompts=args.num_prompts, request_rate=args.request_rate,
            burstiness=args.burstiness, max_concurrency=args.max_concurrency,
            duration=args.duration, prompt_len=args.prompt_len, output_len=args.output_len,
            seed=args.seed, api_key=args.api_key, progress=not args.quiet, slos=slos))
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(format_summary(result["summary"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if result["summary"]["failed"] else 0
