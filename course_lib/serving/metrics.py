"""Prometheus metrics for the server, under vLLM's names, so vLLM's dashboards work on ours.

Two kinds of figures:

* **state read at scrape time** (queue lengths, KV-cache usage, token and preemption totals):
  a custom collector reads the engine's latest :meth:`LLMEngine.stats` snapshot, so a scrape
  never touches the engine while it is stepping;
* **per-request latencies**, observed once when a request finishes: histograms of time to first
  token, inter-token latency, end-to-end latency and queue time, and a counter of finished
  requests by reason (``stop``, ``length``, ``abort``).

Every metric carries a ``model_name`` label, as vLLM's do. Each server gets its own
:class:`~prometheus_client.CollectorRegistry` (several apps can live in one process, e.g. tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: Histogram buckets (seconds), vLLM's for TTFT / ITL / E2E.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

#: Series the server exports (as they appear in ``/metrics``; histograms add _bucket/_sum/_count).
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:num_preemptions_total", "vllm:request_success_total")
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds")


class _EngineStateCollector(Collector):
    """Gauges and engine-wide counters from the latest stats snapshot, read at scrape time."""

    def __init__(self, model_name: str, read_stats: Callable[[], Mapping[str, float]]):
        self.model_name, self.read_stats = model_name, read_stats

    def collect(self) -> Iterator:
        stats = self.read_stats()
        for name, key, doc, kind in (
            ("vllm:num_requests_running", "num_running", "Requests in the running batch.", "gauge"),
            ("vllm:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled.", "gauge"),
            ("vllm:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (0-1).", "gauge"),
            ("vllm:prompt_tokens", "prompt_tokens", "Prompt tokens processed.", "counter"),
            ("vllm:generation_tokens", "generation_tokens", "Tokens generated.", "counter"),
            ("vllm:num_preemptions", "num_preemptions", "Sequences preempted (recompute).", "counter"),
        ):
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats.get(key, 0.0)))
            yield family


class ServerMetrics:
    """The server's metrics: call :meth:`observe_finished` per request, serve :meth:`render`."""

    def __init__(self, model_name: str, read_stats: Callable[[], Mapping[str, float]]):
        disable_created_metrics()  # no *_created series (vLLM turns them off too)
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(model_name, read_stats))
        label = ["model_name"]
        self.request_success = Counter("vllm:request_success", "Finished requests by reason.",
                                       label + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.",
                             label, buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", label,
                             buckets=REQUEST_BUCKETS, registry=self.registry)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.",
                               label, buckets=REQUEST_BUCKETS, registry=self.registry)
        for reason in ("stop", "length", "abort"):  # export every reason from the first scrape
            self.request_success.labels(model_name, reason)

    def observe_finished(self, metrics: Mapping, finish_reason: str) -> None:
        """Record one finished request (``metrics`` as :meth:`Sequence.metrics` returns)."""
        name = self.model_name
        self.request_success.labels(name, finish_reason).inc()
        for histogram, key in ((self.ttft, "ttft"), (self.e2e, "e2e"), (self.queue, "queue_time")):
            if metrics.get(key) is not None:
                histogram.labels(name).observe(metrics[key])
        for gap in metrics.get("itl") or ():
            self.itl.labels(name).observe(gap)

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)


__all__ = ["COUNTERS", "GAUGES", "HISTOGRAMS", "ServerMetrics"]
