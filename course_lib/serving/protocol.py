"""OpenAI's request and response shapes, our limits on them, and the chat template.

Requests are pydantic models that ignore unknown fields (clients send many); the few OpenAI
features this server does not implement (log-probabilities, echo, tools, penalties...) are
refused with a 400 naming the field rather than silently ignored, since ignoring them would
return something other than what was asked for. ``ignore_eos`` and ``top_k`` are vLLM's
extensions, accepted too.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
)

from course_lib.serving.sequence import SEED_MAX, SEED_MIN, SamplingParams

#: Most completions one request may ask for (``n`` times the number of prompts).
MAX_CHOICES = 16
#: OpenAI allows at most four stop strings.
MAX_STOP = 4
#: Longest stop string, in characters. The streamer holds back ``len(longest stop) - 1``
#: characters (they might start a stop string), so a huge one would hold back the whole answer.
MAX_STOP_CHARS = 256
#: Caps on lists a body can hold, so a 4 MiB body of tiny items cannot make pydantic build
#: hundreds of MB of objects before any other check: no model this server loads has a context
#: over 128K tokens (the model's own context is checked after), and no chat needs more messages.
MAX_PROMPT_TOKENS = 2**17
MAX_MESSAGES = 4096


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code, self.headers = code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx this server sends has it (documented in
    ``/openapi.json``)."""

    error: ErrorDetail


def documented(**schema) -> Any:
    """A constraint published in ``/openapi.json`` but checked by the handler, not by pydantic:
    the handler checks in a fixed order (model, empty prompt, stop, max_tokens, context), and a
    pydantic failure would jump that order."""
    return Field(json_schema_extra=schema)


def _prompt_shape(value: Any) -> str | None:
    """Which of ``prompt``'s four shapes a value has, from its type and its first item's: the
    only branch pydantic then validates (trying every branch of a union on a list of a million
    items would build an error per item, for seconds)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else None
        return {str: "texts", list: "token_id_lists"}.get(type(first), "token_ids")
    return None


def _list(max_items: int, min_items: int | None = 1, **schema) -> Any:
    """A list of at most ``max_items`` that stops at its first bad item (checked by pydantic:
    an error per item of a million-item list would take seconds to build), and of at least
    ``min_items`` (checked by the handler, in its order, see :func:`documented`)."""
    if min_items is not None:
        schema.setdefault("minItems", min_items)
    return Field(max_length=max_items, fail_fast=True, json_schema_extra=schema or None)


#: Text that must hold at least one token, and token ids (a model checks its own vocabulary).
NonEmptyText = Annotated[str, documented(minLength=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
StopString = Annotated[str, documented(minLength=1, maxLength=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=-1, json_schema_extra={"not": {"const": 0}})
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: StopString | Annotated[list[StopString], _list(64, None, maxItems=MAX_STOP)] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    # OpenAI features we refuse unless left at their "off" value
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None
    logit_bias: dict[str, Any] | None = None  # (Any: refused anyway; no per-value errors)
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    top_logprobs: StrictInt | None = None
    tools: Annotated[list[Any], _list(MAX_MESSAGES, None)] | None = None


class CompletionRequest(_SamplingFields):
    prompt: Annotated[
        Annotated[NonEmptyText, Tag("text")]
        | Annotated[list[NonEmptyText], _list(MAX_CHOICES), Tag("texts")]
        | Annotated[list[TokenId], _list(MAX_PROMPT_TOKENS), Tag("token_ids")]
        | Annotated[list[Annotated[list[TokenId], _list(MAX_PROMPT_TOKENS)]], _list(MAX_CHOICES),
                    Tag("token_id_lists")],
        Discriminator(_prompt_shape)]
    max_tokens: StrictInt | None = Field(default=16, json_schema_extra={"minimum": 1})
    logprobs: StrictInt | None = None

    def prompts(self) -> list:
        """``prompt`` as a list of prompts (each a text or a list of token ids)."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[dict[str, Any]], _list(MAX_MESSAGES, None)] | None = None

    def text(self) -> str:
        """The message's text; content parts of other types than ``text`` are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"message content parts must be of type 'text' (got "
                                    f"{part.get('type')!r}): this server has a text-only model",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1), _list(MAX_MESSAGES, None)]
    max_tokens: StrictInt | None = Field(default=None, json_schema_extra={"minimum": 1})
    max_completion_tokens: StrictInt | None = Field(default=None, json_schema_extra={"minimum": 1})
    logprobs: StrictBool | None = None

    def prompts(self) -> list:
        return [self.messages]


#: Values that mean "feature off" for the OpenAI fields this server does not implement.
_UNSUPPORTED_OFF = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
                    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
                    "tools": (None, []), "presence_penalty": (None, 0.0),
                    "frequency_penalty": (None, 0.0)}


def check_request_fields(request: CompletionRequest | ChatCompletionRequest,
                         max_tokens: int | None) -> list[str]:
    """Every check that needs no model, run before anything is tokenized, in this order:
    unsupported features, an empty prompt, the stop strings (returned, as a list),
    ``max_tokens``, choices (``n`` x prompts) and seeds (``seed + n - 1`` must stay a signed
    64-bit integer, as vLLM requires). A 400 names the field."""
    check_supported(request)
    prompts = request.prompts()
    if any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must contain at least one token", "prompt")
    stops = stop_strings(request.stop)
    limits = {"max_tokens": max_tokens}
    if isinstance(request, ChatCompletionRequest):  # both are checked, whichever is used
        limits = {"max_tokens": request.max_tokens,
                  "max_completion_tokens": request.max_completion_tokens}
    for name, value in limits.items():
        if value is not None and value < 1:
            raise APIError(400, f"{name} must be at least 1, got {value}", name)
    choices = request.n * len(prompts)
    if choices > MAX_CHOICES:
        raise APIError(400, f"n x prompts must be at most {MAX_CHOICES}, got {choices}", "n")
    if request.seed is not None and request.seed + request.n - 1 > SEED_MAX:
        raise APIError(400, f"seed + n - 1 must be at most {SEED_MAX} (choice i uses seed + i), "
                            f"got {request.seed} + {request.n - 1}", "seed")
    return stops


def check_supported(request: _SamplingFields) -> None:
    """400 for an OpenAI feature this server does not implement, naming the field."""
    for name, off in _UNSUPPORTED_OFF.items():
        value = getattr(request, name, None)
        if not any(value is o or (type(value) is type(o) and value == o) for o in off):
            raise APIError(400, f"{name}={value!r} is not supported by this server; leave it "
                                f"unset", name)
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list, checked: at most four non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop accepts at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings must hold 1 to {MAX_STOP_CHARS} characters", "stop")
    return stops


def sampling_params(request: _SamplingFields, max_tokens: int, index: int) -> SamplingParams:
    """The engine's settings for choice ``index`` of a request (temperature 0 = greedy).

    With a seed and ``n > 1``, choice ``i`` uses ``seed + i``: the same seed for every choice
    would make them all identical.
    """
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    top_k = request.top_k
    if top_k is not None and top_k != -1 and top_k < 1:
        raise APIError(400, f"top_k must be -1 (off) or >= 1, got {top_k}", "top_k")
    seed = None if request.seed is None else request.seed + index
    try:
            return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if request.temperature is None else request.temperature,
                              top_k=None if top_k in (None, -1) else top_k,
                              top_p=None if request.top_p in (None, 1.0) else request.top_p,
                              ignore_eos=request.ignore_eos, seed=seed, output_kind="delta")
    except ValueError as exc:  # the message starts with the field's name
        raise APIError(400, str(exc), str(exc).split()[0]) from None


# --- chat template ---------------------------------------------------------------------------

#: GPT-2-class models have no chat template, so the server uses this one: each message on its
#: own lines as ``User: ...`` / ``Assistant: ...`` (a system message first, as plain text), and
#: ``Assistant:`` to prompt the reply. The model may go on to write the next ``User:`` turn, so
#: ``"\nUser:"`` is always a stop string with this template.
CHAT_ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
CHAT_TURN_STOP = "\nUser:"


def render_chat(messages: list[ChatMessage], tokenizer=None) -> tuple[str, list[str]]:
    """The prompt text for ``messages`` and the stop strings the template needs.

    A tokenizer with its own chat template (``tokenizer.chat_template``) uses it; otherwise the
    simple template above.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True), []
    lines = []
    for m in messages:
        if m.role in ("system", "developer"):
            lines.append(m.text().strip() + "\n")
        else:
            lines.append(f"{CHAT_ROLE_NAMES[m.role]}: {m.text().strip()}")
    lines.append("Assistant:")
    return "\n".join(lines), [CHAT_TURN_STOP]


# --- response shapes -------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
