"""schemathesis against the live server: whatever its schema lets a client send (and much that
it does not), the server answers without a 5xx, with a status and content type it documents,
and every 4xx in OpenAI's error shape.

The cases come from ``/openapi.json`` itself, so the test also keeps the schema honest: a
documented constraint the server does not enforce, or an error it sends but does not document,
fails here.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from test_api import serve  # noqa: E402

from course_lib.serving.api import create_app  # noqa: E402
from course_lib.serving.protocol import ErrorResponse  # noqa: E402

#: The schema, from an app that is never started (the cases run against the live one below).
schema = schemathesis.openapi.from_dict(create_app(lambda: None, "tiny").openapi())


@schemathesis.check
def errors_in_openai_shape(ctx, response, case) -> bool | None:
    """Every 4xx and 5xx body is ``{"error": {"message", "type", "param", "code"}}``."""
    if response.status_code >= 400:
        ErrorResponse.model_validate(response.json())
    return None


@pytest.fixture(scope="module")
def live(request):
    from course_lib.models.hub import load_model

    # a small KV cache: a schema-valid request asks for at most 128 tokens per choice here
    with serve(load_model("tiny", device="cpu"), num_blocks=8, max_num_seqs=16) as server:
        yield server


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_server_answers_every_case_as_documented(case, live):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    case.call_and_validate(base_url=live.url, timeout=120, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        errors_in_openai_shape])
