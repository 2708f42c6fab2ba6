"""The server's outer guard: a body-size limit (413) and one answer for anything unexpected.

An ASGI middleware, so it sees every request before FastAPI does:

- **Body size.** A body over ``max_body_bytes`` gets a 413 before it is parsed: at once when
  ``Content-Length`` says so, or as soon as the bytes read pass the limit (chunked uploads).
  Without it a client could make the server hold and parse a body of any size. The rest of
  the body is then read and dropped, within bounds, before the connection closes, so that a
  client that writes its whole body before reading sees the 413 and not a reset.
- **JSON parsing.** A body within the limit can still hold a million tiny arrays; building them
  makes Python's cyclic garbage collector run full passes over the growing heap, which takes
  about 10x the parse itself (a second, with the event loop, and ``/health``, blocked).
  :class:`JSONRoute` parses request bodies with the collector paused: JSON cannot make cycles.
- **Unexpected exceptions.** Any exception a route lets escape becomes a 500 in OpenAI's error
  shape (never Starlette's plain-text page), logged once per kind, not per request. A
  streaming response that fails after it started is ended by the route itself with an error
  chunk and ``[DONE]``; here it can only be closed.
"""

from __future__ import annotations

import gc
import json
import logging

import anyio
from fastapi import Request
from fastapi.routing import APIRoute

from course_lib.serving.async_engine import MAX_LOGGED_KINDS
from course_lib.serving.protocol import error_body

log = logging.getLogger("course_lib.serving")

#: Default body-size limit: a full-context prompt for each of the 16 choices is well under 1 MiB.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


async def send_error(send, status: int, body: dict, headers: dict[str, str] | None = None,
                     more_body: bool = False) -> None:
    """An error response in OpenAI's shape. ``json.dumps`` escapes non-ASCII, so no text a
    client sent (even an unpaired surrogate) can make the error itself fail to encode.
    ``more_body`` leaves the response open (the caller ends it with an empty body message)."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": more_body})


#: After a 413, how much more of the body is read and thrown away, and for how long, before the
#: connection is closed (nginx's "lingering close"): a client that sends its whole body before
#: reading (httpx, the openai client) would otherwise see a connection reset, not the 413.
DRAIN_MAX_BYTES = 256 * 2**20
DRAIN_MAX_SECONDS = 10.0


class RequestGuard:
    """ASGI middleware: 413 past ``max_body_bytes``; a JSON 500 for anything a route raises.

    The body is read here, up to the limit, before the app sees the request (FastAPI would read
    it whole anyway), then replayed to the app; later ``receive`` calls (a streaming route
    waiting for the client to disconnect) go through to the server.
    """

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
        self.app, self.max_body_bytes = app, max_body_bytes
        self.logged: set[str] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await send_error(send, 400, error_body("invalid Content-Length header"),
                                    {"Connection": "close"})
        if length is not None and int(length) > self.max_body_bytes:
            return await self._refuse(receive, send, headers)
        body = await self._read_body(receive)
        if body is None or body is True:  # True: over the limit, and nothing more will come
            return await self._refuse(receive, send, headers, drain=body is None)
        if body is False:  # the client left while sending
            return None
        await self._run_app(scope, _replay(body, receive), send)

    async def _read_body(self, receive) -> bytes | None | bool:
        """The whole body; None once it passes the limit with more to come, True if its last
        chunk passed the limit; False if the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return True if not message.get("more_body", False) else None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, receive, send, headers: dict, drain: bool = True) -> None:
        """413, then read and drop what the client still sends (bounded), then close."""
        message = error_body(f"the request body is larger than this server's limit of "
                             f"{self.max_body_bytes} bytes", code="request_too_large")
        await send_error(send, 413, message, {"Connection": "close"}, more_body=True)
        if drain and headers.get(b"expect", b"").lower() != b"100-continue":  # (never sent)
            drained = 0
            with anyio.move_on_after(DRAIN_MAX_SECONDS):
                while drained <= DRAIN_MAX_BYTES:
                    message = await receive()
                    drained += len(message.get("body", b""))
                    if message["type"] == "http.disconnect" or not message.get("more_body", False):
                        break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _run_app(self, scope, receive, send) -> None:
        """The app; anything it raises is answered with a JSON 500 if nothing was sent yet."""
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are answered
            kind = f"{type(exc).__name__}: {exc}"[:200]
            if kind not in self.logged and len(self.logged) < MAX_LOGGED_KINDS:
                self.logged.add(kind)
                log.error("unexpected error in %s %s", scope.get("method"), scope.get("path"),
                          exc_info=exc)
            if not started:
                await send_error(send, 500, error_body(f"internal server error ({type(exc).__name__})",
                                                       "server_error", code="internal_error"))


def _replay(body: bytes, receive):
    """A ``receive`` that hands out ``body`` once, then passes through to the server's."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def parse_json(body: bytes):
    """``json.loads`` with the cyclic GC paused (see the module docstring)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(body)
    finally:
        if was_enabled:
            gc.enable()


class _JSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A FastAPI route whose request body is parsed by :func:`parse_json`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_JSONRequest(request.scope, request.receive))
        return route
