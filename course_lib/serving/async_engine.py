"""The engine behind an asyncio server: one thread steps :class:`LLMEngine`, requests stream out.

A forward pass takes milliseconds to seconds and holds the CPU (or launches GPU work); run inside
the event loop it would freeze every connection. So the engine lives in **one background
thread** that loops ``take new requests and aborts -> step -> hand each output to its
request's asyncio queue``. Only that thread touches the engine; the event loop talks to it
through two lists guarded by a lock (requests to add, requests to abort) and reads a stats
snapshot the thread refreshes after every step. torch releases the GIL inside its kernels, so
the event loop keeps serving connections while the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from course_lib.serving.engine import LLMEngine, RequestOutput, StepError
from course_lib.serving.sequence import SamplingParams

log = logging.getLogger("course_lib.serving")


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (the server answers 503 with Retry-After)."""


class RequestFailed(RuntimeError):
    """A request ended by the server, not by the client: ``status`` is the HTTP status to
    answer with (500: its step failed; 503: the server shut down or the engine died)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


#: Consecutive failed steps after which the engine is declared dead (vLLM's EngineDeadError):
#: one failure is a request's bad luck, several in a row mean the engine itself is broken.
MAX_CONSECUTIVE_FAILURES = 3
#: Distinct kinds of failure logged with a traceback (then no more: a log must not grow forever).
MAX_LOGGED_KINDS = 64


class RequestStream:
    """The outputs of one engine request, as an async iterator; :meth:`abort` stops it early.

    ``last`` is the latest :class:`RequestOutput` (its ``metrics`` hold TTFT, ITL, ...).
    """

    def __init__(self, engine: AsyncLLMEngine, request_id: str, arrival_time: float):
        self.request_id, self.arrival_time = request_id, arrival_time
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.finished = False
        self.last: RequestOutput | None = None
        self._engine = engine

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.last = item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop generating and free the KV blocks (a no-op once finished)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    def _put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread: hand an output (or an error) to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


@dataclass
class _Pending:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams


class AsyncLLMEngine:
    """Runs an :class:`LLMEngine` in a background thread for an asyncio server.

    ``max_queue`` bounds the requests waiting to be scheduled: :meth:`submit` raises
    :class:`QueueFullError` beyond it, so an overloaded server sheds load early instead of
    queueing requests it will only time out.
    """

    def __init__(self, engine: LLMEngine, max_queue: int | None = None, idle_wait: float = 0.05,
                 on_dead: Callable[[BaseException], None] | None = None,
                 max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES):
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int)
                                      or max_queue < 1):
            raise ValueError(f"max_queue must be a positive integer or None, got {max_queue!r}")
        self.engine, self.max_queue, self.idle_wait = engine, max_queue, idle_wait
        self.on_dead, self.max_consecutive_failures = on_dead, max_consecutive_failures
        self.dead: BaseException | None = None  # set once the engine is declared dead
        self._closed: RequestFailed | None = None  # set, under the lock, once no request is taken
        self._consecutive_failures = 0
        self._logged: set[str] = set()  # failures already logged (each kind once, not per step)
        self._lock = threading.Lock()
        self._to_add: list[_Pending] = []
        self._to_abort: list[str] = []
        self._fail_with: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = engine.stats()  # refreshed by the engine thread after every step

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (requests still running get an error)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted to the running batch (queued here or in the scheduler)."""
        return len(self._to_add) + len(self.engine.scheduler.waiting)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (what a graceful shutdown waits for)."""
        return len(self._streams)

    def current_stats(self) -> dict[str, float]:
        """The latest engine stats, with the waiting count including requests not yet handed over."""
        return {**self.stats, "num_waiting": self.num_waiting}

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError now (before queueing) if the request could never run."""
        self.engine.check_request(prompt_token_ids, params)

    def submit(self, request_id: str, prompt_token_ids: list[int],
               params: SamplingParams) -> RequestStream:
        """Queue a request (checked first); raises :class:`QueueFullError` past ``max_queue``."""
        return self.submit_all([(request_id, prompt_token_ids, params)])[0]

    def submit_all(self, jobs: list[tuple[str, list[int], SamplingParams]]) -> list[RequestStream]:
        """Queue several requests (``n`` choices, several prompts) all or none: each is checked,
        and the queue limit applies to all of them, before any is queued."""
        for _, ids, params in jobs:
            self.check_request(ids, params)
        if self.max_queue is not None and len(jobs) > self.max_queue:
            raise ValueError(f"{len(jobs)} requests at once can never be queued: the queue holds "
                             f"at most {self.max_queue} (--max-queue)")
        arrival = time.perf_counter()
        streams = [RequestStream(self, request_id, arrival) for request_id, _, _ in jobs]
        with self._lock:
            if self._closed is not None:  # the engine thread has stopped taking requests
                raise RequestFailed(str(self._closed), 503)
            taken = [r for r, _, _ in jobs if r in self._streams]
            if taken or len({r for r, _, _ in jobs}) != len(jobs):
                raise ValueError(f"request ids must be unused and distinct: {taken or jobs}")
            if self.max_queue is not None and self.num_waiting + len(jobs) > self.max_queue:
                raise QueueFullError(f"the server's queue is full ({self.num_waiting} waiting, "
                                     f"limit {self.max_queue}); retry later")
            for stream, (_, ids, params) in zip(streams, jobs, strict=True):
                self._streams[stream.request_id] = stream
                self._to_add.append(_Pending(stream, list(ids), params))
        self._wake.set()
        return streams

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._to_abort.append(request_id)
        self._wake.set()

    def abort_all(self, reason: str) -> None:
        """End every request now with an error (``reason``): e.g. a shutdown timeout ran out."""
        with self._lock:
            self._fail_with = RequestFailed(reason, 503)
        self._wake.set()

    async def wait_until_idle(self, timeout: float) -> bool:
        """Wait until every submitted request has finished; False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        while self._streams:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._take_commands()
                if not (self.engine.has_unfinished_requests() or self.engine.finished_unreported):
                    self.stats = self.engine.stats()
                    self._wake.wait(self.idle_wait)
                    continue
                try:
                    outputs = self.engine.step()
                except StepError as exc:
                    self._step_failed(exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - failed before it knew its requests
                    involved = list(self._streams)
                    self._fail_all(RequestFailed(f"generation failed: {exc}", 500))
                    self._step_failed(StepError(involved, exc))
                    continue
                self._consecutive_failures = 0
                self.stats = self.engine.stats()
                self._deliver_all(outputs)
        except Exception as exc:  # noqa: BLE001 - a bug outside step(): the engine cannot go on
            self._die(exc)
            return
        self._close(RequestFailed("the server is shutting down", 503))

    def _close(self, failure: RequestFailed) -> None:
        """Stop taking requests (under the lock, so none slips in after) and fail every one
        still queued or running with ``failure``."""
        with self._lock:
            self._closed = failure
            pending, self._to_add = self._to_add, []
        for item in pending:
            self._streams.pop(item.stream.request_id, None)
            item.stream._put(failure)
        self._fail_all(failure)

    def _step_failed(self, exc: StepError) -> None:
        """Fail the requests of the failed step; too many failures in a row kill the engine."""
        self._consecutive_failures += 1
        key = str(exc)
        if key not in self._logged and len(self._logged) < MAX_LOGGED_KINDS:
            self._logged.add(key)  # each kind of failure logged once, with its traceback
            log.error("engine step failed (requests %s aborted)", exc.request_ids, exc_info=exc)
        failure = RequestFailed(f"generation failed: {exc}", 500)
        for request_id in exc.request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._put(failure)
        self.stats = self.engine.stats()
        if self._consecutive_failures >= self.max_consecutive_failures:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """Declare the engine dead: fail everything, stop the thread, tell the server."""
        log.critical("the engine is dead (%d failed step(s) in a row, last: %s); every request "
                     "is failed and the server must restart", self._consecutive_failures, exc,
                     exc_info=exc if str(exc) not in self._logged else None)
        self.dead = exc
        self._stop.set()
        self._close(RequestFailed(f"the engine is dead: {exc}", 503))
        if self.on_dead is not None:
            self.on_dead(exc)

    def _take_commands(self) -> None:
        with self._lock:
            to_add, self._to_add = self._to_add, []
            to_abort, self._to_abort = self._to_abort, []
            fail_with, self._fail_with = self._fail_with, None
        for item in to_add:
            stream = item.stream
            try:
                self.engine.add_request(item.prompt_token_ids, item.params, stream.request_id,
                                        arrival_time=stream.arrival_time)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                self._streams.pop(stream.request_id, None)
                stream._put(RequestFailed(str(exc), 400 if isinstance(exc, ValueError) else 500))
        for request_id in to_abort:
            if not self.engine.abort(request_id):  # never added, or already finished
                self._streams.pop(request_id, None)
        if fail_with is not None:
            self._fail_all(fail_with)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams in one event-loop callback per loop: waking
        the loop once per step, not once per token, leaves the engine thread more of the GIL."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
                pass

    def _fail_all(self, exc: BaseException) -> None:
        """End every request with ``exc``, including any sequence the scheduler holds that no
        stream owns, and free every block."""
        for request_id in list(self._streams):
            self._streams.pop(request_id)._put(exc)
        for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            if not self.engine.abort(seq.request_id):
                self.engine.scheduler.finish(seq)  # an orphan the engine does not know
        self.engine.finished_unreported.clear()
        self.engine.requests.clear()
        self.stats = self.engine.stats()


__all__ = ["AsyncLLMEngine", "QueueFullError", "RequestFailed", "RequestStream"]
