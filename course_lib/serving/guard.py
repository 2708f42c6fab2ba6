"""The server's outer guard: a body-size limit (413) and one answer for anything unexpected.

An ASGI middleware, so it sees every request before FastAPI does:

- **Body size.** A body over ``max_body_bytes`` gets a 413 before it is parsed: at once when
  ``Content-Length`` says so, or as soon as the bytes read pass the limit (chunked uploads).
  Without it a client could make the server hold and parse a body of any size.
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

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from course_lib.serving.protocol import error_body

log = logging.getLogger("course_lib.serving")

#: Default body-size limit: a full-context prompt for each of the 16 choices is well under 1 MiB.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


class BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so FastAPI's body parsing passes it on
    (as a 413) instead of turning it into "error parsing the body"."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} "
                              "bytes", {"Connection": "close"})


async def send_error(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """An error response in OpenAI's shape. ``json.dumps`` escapes non-ASCII, so no text a
    client sent (even an unpaired surrogate) can make the error itself fail to encode."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """ASGI middleware: 413 past ``max_body_bytes``; a JSON 500 for anything a route raises."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
        self.app, self.max_body_bytes = app, max_body_bytes
        self.logged: set[str] = set()

    def too_large(self) -> dict:
        return error_body(f"the request body is larger than this server's limit of "
                          f"{self.max_body_bytes} bytes", param=None, code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            status = 413 if length.isdigit() else 400
            body = self.too_large() if status == 413 else error_body("invalid Content-Length")
            return await send_error(send, status, body, {"Connection": "close"})
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._limited(receive), tracking_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, 413, self.too_large(), {"Connection": "close"})
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are answered
            kind = f"{type(exc).__name__}: {exc}"[:200]
            if kind not in self.logged:
                self.logged.add(kind)
                log.error("unexpected error in %s %s", scope.get("method"), scope.get("path"),
                          exc_info=exc)
            if not started:
                await send_error(send, 500, error_body(f"internal server error ({type(exc).__name__})",
                                                       "server_error", code="internal_error"))

    def _limited(self, receive):
        """``receive`` that raises :class:`BodyTooLarge` once the body passes the limit."""
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message
        return limited_receive


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
