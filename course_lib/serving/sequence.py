"""One request's state as it moves through the engine: waiting -> running -> finished.

A :class:`Sequence` holds the prompt and generated tokens, the sampling settings, where its
keys and values live (``block_table``, filled by the block manager), how far the model has
computed it (``num_computed_tokens``: chunked prefill advances it chunk by chunk, preemption by
recompute resets it to 0), and the timestamps the latency metrics are made of.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from course_lib.generation.sampling import check_sampling_args


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


#: Why a sequence stopped: a stop token, its ``max_tokens``, or an abort (as OpenAI / vLLM name them).
FINISH_REASONS = ("stop", "length", "abort")

#: The seeds a request may carry: a signed 64-bit integer, as vLLM accepts (``torch.Generator``
#: takes [-2**63, 2**64 - 1]; anything outside would fail only once the request is running).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

#: What each :class:`RequestOutput` of a request carries (vLLM's ``RequestOutputKind``): every
#: output token so far (``cumulative``), or only the tokens since the last output (``delta``:
#: what a streaming server wants, O(1) per token instead of O(output length)).
OUTPUT_KINDS = ("cumulative", "delta")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (vLLM's names and defaults; temperature 0 = greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer), "
                             f"got {self.seed}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")


_ids = itertools.count()


class Sequence:
    """A request: prompt token ids, generated ids, settings, status, block table, timestamps."""

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                 request_id: str | None = None, prompt: str | None = None,
                 arrival_time: float | None = None):
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt must contain at least one token")
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.params = params or SamplingParams()
        self.token_ids: list[int] = [int(t) for t in prompt_token_ids]
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache
        self.num_preemptions = 0
        self.num_reported_tokens = 0  # output tokens already handed out (delta outputs)
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.token_times: list[float] = []  # when each output token was produced
        self.finish_time: float | None = None

    # ---------------------------------------------------------------- sizes
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens whose K/V are not in the cache yet: 1 when decoding, more in prefill."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """True once the prompt (and any recomputed output) is cached and one new token waits."""
        return self.num_output_tokens > 0 and self.num_pending_tokens == 1

    # ---------------------------------------------------------------- updates
    def append_token(self, token_id: int, now: float | None = None) -> None:
        self.token_ids.append(int(token_id))
        self.token_times.append(time.perf_counter() if now is None else now)

    def finish(self, reason: str, now: float | None = None) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter() if now is None else now

    # ---------------------------------------------------------------- metrics
    def metrics(self, since: int = 0) -> dict[str, float | list[float] | None]:
        """Seconds: queue time, time to first token, inter-token latencies, end-to-end latency.

        ``itl`` holds the gaps before output tokens ``since`` onwards (a delta output passes the
        tokens it already reported, so a long stream costs O(1) per token, not O(length)).
        """
        first = self.token_times[0] if self.token_times else None
        times = self.token_times[max(since - 1, 0):]
        return {
            "queue_time": (None if self.first_scheduled_time is None
                           else self.first_scheduled_time - self.arrival_time),
            "ttft": None if first is None else first - self.arrival_time,
            "itl": [b - a for a, b in itertools.pairwise(times)],
            "e2e": None if self.finish_time is None else self.finish_time - self.arrival_time,
        }

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table})")
