"""A request's prompt -> token ids, with a bounded cost: what a client sends is never tokenized
far past what the model's context can hold.

Tokenizing is the one piece of a request's work that grows with what the client sent, before
any limit on it is known: a 50 MB prompt would take a minute to tokenize, only to be refused for
not fitting the context. So the text is measured first. No token decodes to more characters than
the longest entry in the vocabulary (``max_token_chars``), so a text longer than ``(context + 1)
x max_token_chars`` characters holds more than ``context`` tokens for sure, and is refused
without being tokenized. A shorter one that is still long is tokenized a slice at a time (cut
at whitespace), and refused as soon as the slices hold more tokens than the context plus what
cutting could have added: an over-long prompt costs a slice or two of tokenizing, not all of it.
The server runs these functions in a worker thread, off the event loop (as vLLM does), so even
that bounded work never stalls other clients or ``/health``.
"""

from __future__ import annotations

import weakref

from course_lib.serving.protocol import APIError, ChatMessage, render_chat

_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> chars


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can decode to (its longest vocabulary
    entry, special tokens included: byte-level BPE stores one character per byte)."""
    if tokenizer not in _MAX_TOKEN_CHARS:
        _MAX_TOKEN_CHARS[tokenizer] = max(max(map(len, tokenizer.get_vocab())), 1)
    return _MAX_TOKEN_CHARS[tokenizer]


def check_text(text: str, field: str) -> None:
    """400 unless ``text`` is valid Unicode (JSON can carry unpaired surrogates like ``\\ud800``,
    which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{field} is not valid Unicode: {exc.reason} at character "
                            f"{exc.start}", field) from None


def check_request_text(request) -> None:
    """400 for any prompt or message text that is not valid Unicode: cheap, so it runs before
    the request can be shed for load (an invalid request gets its 400 whatever the load)."""
    if hasattr(request, "messages"):
        for message in request.messages:
            check_text(message.text(), "messages")
        return
    for prompt in request.prompts():
        if isinstance(prompt, str):
            check_text(prompt, "prompt")


def too_long(context: int, field: str, tokens: str) -> APIError:
    return APIError(400, f"the {field} has {tokens} tokens, more than this model's context of "
                         f"{context} tokens", field, code="context_length_exceeded")


def surely_longer(text: str, tokenizer, context: int) -> bool:
    """Whether ``text`` has more than ``context`` tokens, found by tokenizing slices of about
    ``4 x (context + 1)`` characters until their tokens, less ``2 x max_token_chars`` per cut
    (the most a cut inside a word can add), pass ``context``. False means "maybe not"."""
    size, slack = 4 * (context + 1), 2 * max_token_chars(tokenizer)
    if len(text) <= size:
        return False
    tokens = cuts = start = 0
    while start < len(text):
        end = min(start + size, len(text))
        space = text.rfind(" ", start + size // 2, end) if end < len(text) else -1
        end = space if space > start else end
        tokens += len(tokenizer.encode(text[start:end], add_special_tokens=False))
        cuts += end < len(text)  # a cut at this slice's end may have added tokens to it too
        if tokens - slack * cuts > context:
            return True
        start = end
    return False


def encode_text(text: str, tokenizer, context: int, field: str) -> list[int]:
    """Token ids of ``text``; a 400 naming ``field`` if it is not valid Unicode, is empty once
    tokenized, or cannot fit the context (refused before tokenizing it all when it is plainly
    too long)."""
    check_text(text, field)
    if len(text) > (context + 1) * max_token_chars(tokenizer) or surely_longer(text, tokenizer,
                                                                               context):
        raise too_long(context, field, f"over {context}")
    ids = tokenizer.encode(text)
    if len(ids) > context:
        raise too_long(context, field, str(len(ids)))
    if not ids:
        raise APIError(400, f"the {field} must contain at least one token", field)
    return ids


def completion_prompts(prompt: str | list, tokenizer, context: int) -> list[list[int]]:
    """``prompt`` (text, texts, token ids, or lists of token ids; shape-checked by the request
    model) as lists of token ids."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(encode_text(p, tokenizer, context, "prompt"))
        elif len(p) > context:
            raise too_long(context, "prompt", str(len(p)))
        else:
            out.append(list(p))
    return out


def chat_prompt(messages: list[ChatMessage], tokenizer, context: int) -> tuple[list[int], list[str]]:
    """The chat template applied to ``messages``, as token ids, and the template's stop strings."""
    text, stops = render_chat(messages, tokenizer)  # (bounded by the body size)
    return encode_text(text, tokenizer, context, "messages"), stops
