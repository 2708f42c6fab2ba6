"""An OpenAI-compatible HTTP server over :class:`~course_lib.serving.engine.LLMEngine`.

``create_app(load_engine, model_name)`` returns a FastAPI app with OpenAI's routes
(``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``), so the unmodified ``openai``
client (or vLLM's benchmark, or curl) can talk to it, plus ``/health``, ``/metrics`` (vLLM's
metric names) and ``/version``. The model loads in a thread after the server starts listening:
``/health`` says 503 until it is ready, which is what a Kubernetes startup probe waits for.

Every request is one or more engine requests (``n`` choices per prompt) that stream tokens out
of :class:`~course_lib.serving.async_engine.AsyncLLMEngine`; a client that disconnects aborts
them, which frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from course_lib import __version__
from course_lib.serving import openapi
from course_lib.serving.async_engine import (
    AsyncLLMEngine,
    QueueFullError,
    RequestFailed,
    RequestStream,
)
from course_lib.serving.detokenizer import IncrementalText
from course_lib.serving.engine import LLMEngine
from course_lib.serving.guard import DEFAULT_MAX_BODY_BYTES, JSONRoute, RequestGuard
from course_lib.serving.metrics import ServerMetrics
from course_lib.serving.prompts import chat_prompt, check_request_text, completion_prompts
from course_lib.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_request_fields,
    error_body,
    new_id,
    now,
    sampling_params,
    usage,
)

log = logging.getLogger("course_lib.serving")

#: Seconds a client is told to wait (``Retry-After``) when the queue is full or the server is busy.
RETRY_AFTER = "1"


class ServerState:
    """What the routes share: the engine once loaded, the status, the metrics."""

    def __init__(self, load_engine: Callable[[], LLMEngine], model_name: str, max_queue: int | None,
                 on_fatal_error: Callable[[BaseException], None] | None = None):
        self.load_engine, self.model_name, self.max_queue = load_engine, model_name, max_queue
        self.on_fatal_error = on_fatal_error
        self.status = "loading"  # -> ready -> draining; or failed (loading), or dead (engine)
        self.engine: AsyncLLMEngine | None = None
        self.preparing = 0  # requests being tokenized (event-loop side, so no lock needed)
        self.created = now()
        self.metrics = ServerMetrics(model_name, self._stats)

    def _stats(self) -> dict[str, float]:
        return self.engine.current_stats() if self.engine is not None else {}

    def load(self) -> None:
        """Build the engine (in a worker thread) and start it; on failure, report and stay 503."""
        try:
            engine = AsyncLLMEngine(self.load_engine(), self.max_queue, on_dead=self.engine_died)
            engine.start()
        except BaseException as exc:  # noqa: BLE001 - reported, and /health says why
            self.status = "failed"
            log.exception("loading the model failed")
            if self.on_fatal_error is not None:
                self.on_fatal_error(exc)
            return
        self.engine = engine
        if self.status == "loading":
            self.status = "ready"

    def engine_died(self, exc: BaseException) -> None:
        """The engine gave up (repeated step failures): 503 from now on, and the process is
        told to exit so that an orchestrator restarts it (vLLM's EngineDeadError)."""
        self.status = "dead"
        if self.on_fatal_error is not None:
            self.on_fatal_error(exc)

    def begin_drain(self) -> None:
        """Stop admitting requests (503) and fail the health check; running ones go on."""
        self.status = "draining"

    def ready_engine(self) -> AsyncLLMEngine:
        if self.status != "ready" or self.engine is None:
            reason = {"loading": "the model is still loading", "draining": "the server is shutting down",
                      "failed": "the model failed to load",
                   "dead": "the engine failed and the server is restarting"}.get(self.status, self.status)
            raise APIError(503, f"service unavailable: {reason}", type="service_unavailable_error",
                           headers={"Retry-After": RETRY_AFTER})
        return self.engine


# --- streaming plumbing ------------------------------------------------------------------------


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client goes away.

    Whatever ASGI version the server speaks, it listens for ``http.disconnect`` while streaming
    and cancels the stream then, so the requests behind it are aborted at once (not at the next
    token) and their KV blocks freed.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                with suppress(OSError):
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        with suppress(Exception):
            await self.body_iterator.aclose()
        self.on_close()  # even if the body never started


async def until_disconnect(request: Request, work):
    """Await ``work``; cancel it if the client disconnects first (then returns None)."""
    result = None

    async with anyio.create_task_group() as group:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        async def run() -> None:
            nonlocal result
            result = await work
            group.cancel_scope.cancel()

        group.start_soon(watch)
        group.start_soon(run)
    return result


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator:
    """Items from several async iterators as they come (one task per iterator)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(iterator: AsyncIterator) -> None:
        try:
            async for item in iterator:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --- one request, whatever its shape -------------------------------------------------------------


class Generation:
    """The engine requests behind one HTTP request: ``n`` choices for each prompt.

    Iterating yields ``(choice index, new text, finish reason or None)``; ``finish`` aborts what
    is still running (client gone, or stopped early) and records each request's metrics.
    """

    def __init__(self, state: ServerState, prompts: list[list[int]], n: int, params_for,
                 stops: list[str]):
        engine = state.ready_engine()
        self.state, self.stops = state, stops
        self.prompt_tokens = sum(len(p) for p in prompts)
        jobs = [(p, params_for(p, i)) for p in prompts for i in range(n)]
        for ids, params in jobs:  # every choice checked before any is queued
            try:
                engine.check_request(ids, params)
            except ValueError as exc:
                raise context_error(engine, ids, exc) from None
        self.base_id = new_id("req")
        try:  # all choices or none
            self.streams = engine.submit_all([(f"{self.base_id}-{i}", ids, params)
                                              for i, (ids, params) in enumerate(jobs)])
        except QueueFullError as exc:
            raise queue_full(str(exc)) from None
        except RequestFailed as exc:
            raise failure_error(exc) from None
        except ValueError as exc:  # more choices than the queue can ever hold
            raise APIError(400, str(exc), "n") from None
        self.reasons: dict[int, str] = {}
        self.completion_tokens: dict[int, int] = {}
        self.itl: dict[int, list[float]] = {}
        self.finished = False

    async def _choice(self, index: int, stream: RequestStream) -> AsyncIterator[tuple[int, str, str | None]]:
        text = IncrementalText(self.state.engine.engine.tokenizer, self.stops)
        itl = self.itl.setdefault(index, [])
        async for out in stream:  # delta outputs: only the tokens new since the last one
            if out.finish_reason == "abort":
                raise RequestFailed("the request was aborted by the server", 500)
            self.completion_tokens[index] = out.num_output_tokens
            itl += out.metrics.get("itl") or ()
            delta = text.update(out.output_token_ids, out.finished)
            reason = "stop" if text.stopped else out.finish_reason
            if text.stopped:
                stream.abort()  # a stop string: free the blocks now
            if reason is not None:
                self.reasons[index] = reason
            if delta or reason is not None:
                yield index, delta, reason
            if reason is not None:
                return

    def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        return merge([self._choice(i, s) for i, s in enumerate(self.streams)])

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, sum(self.completion_tokens.values()))

    def finish(self) -> None:
        """Abort what still runs and record each request's metrics (once)."""
        if self.finished:
            return
        self.finished = True
        for index, stream in enumerate(self.streams):
            stream.abort()
            metrics = dict(stream.last.metrics) if stream.last is not None else {}
            metrics["itl"] = self.itl.get(index, [])
            if metrics.get("e2e") is None:  # stopped early: latency up to now
                metrics["e2e"] = time.perf_counter() - stream.arrival_time
            self.state.metrics.observe_finished(metrics, self.reasons.get(index, "abort"))


def queue_full(message: str) -> APIError:
    """503 + Retry-After: the load is shed early, the client retries later."""
    return APIError(503, message, type="service_unavailable_error", code="queue_full",
                    headers={"Retry-After": RETRY_AFTER})


def failure_error(exc: RequestFailed) -> APIError:
    """The JSON error for a request the server could not finish (500, or 503 + Retry-After)."""
    if exc.status == 503:
        return APIError(503, str(exc), type="service_unavailable_error",
                        headers={"Retry-After": RETRY_AFTER})
    return APIError(exc.status, str(exc), type="server_error" if exc.status >= 500 else
                    "invalid_request_error", code="internal_error" if exc.status >= 500 else None)


def context_error(engine: AsyncLLMEngine, ids: list[int], exc: ValueError) -> APIError:
    """400 for a request that cannot fit: blame the prompt if it alone fills the engine's
    ``max_model_len`` (the context, or a smaller KV cache), whatever max_tokens was."""
    message = str(exc)
    over = "context" in message or "KV slots" in message
    prompt_at_fault = not over or len(ids) >= engine.engine.max_model_len
    return APIError(400, message, "prompt" if prompt_at_fault else "max_tokens",
                    code="context_length_exceeded" if over else None)


# --- the app -------------------------------------------------------------------------------------


def _default_max_tokens(requested: int | None, context: int):
    """A ``params_for`` builder: the request's max_tokens, or what ``context`` (the engine's
    ``max_model_len``: the model's context or the KV cache's capacity, the smaller) leaves."""
    def pick(ids: list[int]) -> int:
        return requested if requested is not None else max(1, context - len(ids))
    return pick


def create_app(load_engine: Callable[[], LLMEngine], model_name: str = "tiny", *,
               api_key: str | None = None, max_queue: int | None = 256,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               on_fatal_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server: ``load_engine()`` runs in a thread once the server listens (``/health`` is
    503 until it returns). ``api_key`` guards ``/v1/*`` (``Authorization: Bearer KEY``); bodies
    over ``max_body_bytes`` get a 413. ``on_fatal_error`` is called if the model fails to load
    or the engine dies: the process should then exit (``course-lib serve`` does)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key must not be empty or blank (leave it unset for no key)")
    state = ServerState(load_engine, model_name, max_queue, on_fatal_error)
    # tokenizing runs here, off the event loop, so a big prompt never stalls other clients
    tokenizer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.get_running_loop().run_in_executor(None, state.load)
        try:
            yield
        finally:
            await loader
            if state.engine is not None:
                state.engine.stop()
            tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="course_lib OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)

    def error_response(status: int, body: dict, headers: dict | None = None) -> Response:
        return Response(json.dumps(body), status, headers=headers, media_type="application/json")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None  # the request's field (not pydantic's union branch)
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return error_response(400, error_body(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, error_body(str(exc.detail), kind), exc.headers)

    key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()

    def check_key(request: Request) -> None:
        """Compare digests of the bytes sent: any header value (non-ASCII too) is just wrong,
        and the comparison takes the same time whatever the key's length."""
        if key_digest is None:
            return
        raw = dict(request.scope["headers"]).get(b"authorization", b"")
        scheme, _, token = raw.partition(b" ")
        sent = hashlib.sha256(token.strip()).digest()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(sent, key_digest):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{model_name!r}", "model", "not_found_error", "model_not_found")

    @app.get("/health", responses=openapi.responses(503))
    async def health() -> JSONResponse:
        ok = state.status == "ready"
        return JSONResponse({"status": state.status}, 200 if ok else 503,
                            headers=None if ok else {"Retry-After": RETRY_AFTER})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response, responses=openapi.TEXT_RESPONSE)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def start(body, prompt_of, max_tokens: int | None) -> Generation:
        """Check a request and queue its choices. Every check that needs no model runs first;
        then ``prompt_of(tokenizer, context)`` gives the token ids of the prompt(s) and any stop
        strings a chat template needs, computed in a worker thread."""
        check_model(body.model)
        stops = check_request_fields(body, max_tokens)
        check_request_text(body)
        engine = state.ready_engine()
        # requests being tokenized count against --max-queue too: a flood of big prompts waits
        # in no unbounded line, holding its bodies, before the engine's queue would refuse it
        if engine.max_queue is not None and engine.num_waiting + state.preparing >= engine.max_queue:
            raise queue_full(f"the server's queue is full ({engine.num_waiting} waiting, "
                             f"{state.preparing} being tokenized, limit {engine.max_queue}); "
                             "retry later")
        tokenizer, context = engine.engine.tokenizer, engine.engine.model.config.n_positions
        state.preparing += 1
        try:
            prompts, template_stops = await asyncio.get_running_loop().run_in_executor(
                tokenizer_pool, prompt_of, tokenizer, context)
        finally:
            state.preparing -= 1
        pick = _default_max_tokens(max_tokens, engine.engine.max_model_len)
        return Generation(state, prompts, body.n, lambda ids, i: sampling_params(body, pick(ids), i),
                          stops + template_stops)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], route_class=JSONRoute)

    @v1.get("/models", responses=openapi.responses(401))
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": state.created, "owned_by": "course_lib"}]}

    @v1.post("/completions", responses=openapi.GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        gen = await start(body, lambda tokenizer, context: (
            completion_prompts(body.prompt, tokenizer, context), []), body.max_tokens)
        head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                "model": model_name}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            def chunk(index: int, text: str, reason: str | None) -> dict:
                out = {**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                            "finish_reason": reason}]}
                return {**out, "usage": None} if include_usage else out

            return EventStreamResponse(_stream(gen, [], chunk, head, include_usage), gen.finish)
        texts, reasons = await _collect(gen, request)
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                   for i in range(len(texts))]
        return {**head, "choices": choices, "usage": gen.usage()}

    @v1.post("/chat/completions", responses=openapi.GENERATION_RESPONSES)
    async def chat(body: ChatCompletionRequest, request: Request):
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

        def prompt_of(tokenizer, context: int) -> tuple[list[list[int]], list[str]]:
            ids, stops = chat_prompt(body.messages, tokenizer, context)
            return [ids], stops

        gen = await start(body, prompt_of, requested)
        head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(),
                "model": model_name}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text else {})
                out = {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                            "finish_reason": reason}]}
                return {**out, "usage": None} if include_usage else out

            first = [chunk(i, None, None, role=True) for i in range(len(gen.streams))]
            return EventStreamResponse(_stream(gen, first, chunk, head, include_usage, split=True),
                                       gen.finish)
        texts, reasons = await _collect(gen, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None, "finish_reason": reasons[i]} for i in range(len(texts))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": gen.usage()}

    app.include_router(v1)
    openapi.install(app)
    return app


async def _collect(gen: Generation, request: Request) -> tuple[list[str], list[str | None]]:
    """A non-streaming request's text and finish reason per choice; aborted if the client
    leaves first. A request the server could not finish is answered with its JSON error."""
    pieces: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    failure: list[RequestFailed] = []

    async def collect() -> None:
        try:
            async for index, text, reason in gen.events():
                pieces.setdefault(index, []).append(text)
                reasons[index] = reason
        except RequestFailed as exc:  # kept out of the task group, which would wrap it
            failure.append(exc)

    try:
        await until_disconnect(request, collect())
    finally:
        gen.finish()
    if failure:
        raise failure_error(failure[0])
    n = len(gen.streams)
    return ["".join(pieces.get(i, [])) for i in range(n)], [reasons.get(i) for i in range(n)]


async def _stream(gen: Generation, first: list[dict], chunk, head: dict, include_usage: bool,
                  split: bool = False) -> AsyncIterator[str]:
    """SSE body: ``first`` chunks, one chunk per text delta, the usage chunk, ``[DONE]``.

    ``split`` (chat) sends the finish reason in its own chunk with an empty delta, as OpenAI
    does. An error mid-stream becomes an error chunk in OpenAI's shape; ``[DONE]`` always ends
    the stream.
    """
    try:
        for payload in first:
            yield sse(payload)
        async for index, text, reason in gen.events():
            if split and text:
                yield sse(chunk(index, text, None))
            if split and reason is not None:
                yield sse(chunk(index, None, reason))
            elif not split:
                yield sse(chunk(index, text, reason))
        if include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    except Exception as exc:  # noqa: BLE001 - the client gets an error chunk, not a cut stream
        error = failure_error(exc if isinstance(exc, RequestFailed) else RequestFailed(
            f"generation failed: {type(exc).__name__}: {exc}", 500))
        if not isinstance(exc, RequestFailed):
            log.exception("request %s failed mid-stream", gen.base_id)
        yield sse(error.body())
    finally:
        gen.finish()
    yield sse("[DONE]")
