"""Serving: continuous batching over a paged KV cache (chapters 5-6), and its baselines.

- :mod:`~course_lib.serving.sequence`: a request's state, sampling settings and timestamps.
- :mod:`~course_lib.serving.block_manager`: the KV block pool (ref counts, copy-on-write,
  prefix caching).
- :mod:`~course_lib.serving.scheduler`: per-step budgets, decodes first, chunked prefill,
  preemption by recompute.
- :mod:`~course_lib.serving.engine`: ``LLMEngine`` (add_request / step / abort / generate).
- :mod:`~course_lib.serving.static_batching`: the static-batching baseline.
"""
