"""``/openapi.json`` that tells the truth about the errors this server sends.

FastAPI documents a 422 for every route with a body; this server never sends one (a malformed
request is a 400 in OpenAI's error shape), and it does send 400, 401, 404, 413, 500 and 503,
each with that shape. Routes declare which of these they can answer with
(:func:`responses`, :data:`GENERATION_RESPONSES`); :func:`install` drops FastAPI's 422 and its
validation-error schemas, so a client generator or schemathesis sees what really comes back.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from course_lib.serving.protocol import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "Invalid request: the error names the field (`param`).",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "The request body is larger than the server's limit.",
    500: "The server failed while generating (OpenAI's error shape, `type` server_error).",
    503: "Not ready, shutting down, the engine died, or the queue is full; see `Retry-After`.",
}


def responses(*statuses: int) -> dict:
    """FastAPI ``responses=`` for these error statuses, each with OpenAI's error schema."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
            for status in statuses}


#: What a generation route can answer: JSON, or server-sent events when ``stream`` is true.
GENERATION_RESPONSES = {
    200: {"description": "The completion (JSON), or its chunks as server-sent events when "
                         "`stream` is true.",
          "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
    **responses(400, 401, 404, 413, 500, 503),
}

#: ``/metrics``: Prometheus's text format, not JSON.
TEXT_RESPONSE = {200: {"description": "Prometheus metrics (text exposition format).",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}}


def install(app: FastAPI) -> None:
    """Serve the corrected schema at ``/openapi.json`` (built once, on first request)."""

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema
