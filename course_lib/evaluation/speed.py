"""Timing that is fair to compare: warm-up, device sync, median of repeats, same prompt.

Used by the quantization report (tokens per second of each model variant, measured in the
same run) and by the benchmarks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from course_lib.generation.generate import generate_with_cache


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int = 3,
                   device: torch.device | str = "cpu", warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a KV cache, for HF GPT-2 and `course_lib.models.gpt.GPT`.

    The project's one cached loop, :func:`course_lib.generation.generate.generate_with_cache`:
    a plain forward loop (no logits processors or stopping criteria) so that what is timed is
    the model itself. Returns the ``new_tokens`` generated ids, [batch, new_tokens].
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    return generate_with_cache(model, prompt, new_tokens).tokens


def decode_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 32,
                             repeats: int = 3) -> float:
    """Batch-1-style decode speed: generated tokens per second of `greedy_decode`."""
    seconds = median_seconds(lambda: greedy_decode(model, prompt, new_tokens), repeats,
                             _model_device(model))
    return prompt.shape[0] * new_tokens / seconds
