"""A request's prompt -> token ids, with a bounded cost: what a client sends is never tokenized
far past what the model's context can hold.

Tokenizing is the one piece of a request's work that grows with what the client sent, before
any limit on it is known: a 50 MB prompt would take a minute to tokenize, only to be refused for
not fitting the context. So the text is measured first. No token decodes to more characters than
the longest entry in the vocabulary (``max_token_chars``), so a text longer than ``(context + 1)
x max_token_chars`` characters holds more than ``context`` tokens for sure, and is refused
without being tokenized. Anything shorter costs at most that many characters of tokenizing.
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


def too_long(context: int, field: str, tokens: str) -> APIError:
    return APIError(400, f"the {field} has {tokens} tokens, more than this model's context of "
                         f"{context} tokens", field, code="context_length_exceeded")


def encode_text(text: str, tokenizer, context: int, field: str) -> list[int]:
    """Token ids of ``text``; a 400 naming ``field`` if it is not valid Unicode, is empty once
    tokenized, or cannot fit the context (refused before tokenizing when it is plainly too long)."""
    check_text(text, field)
    if len(text) > (context + 1) * max_token_chars(tokenizer):
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
    texts = [m.text() for m in messages]
    for text in texts:
        check_text(text, "messages")
    if sum(map(len, texts)) > (context + 1) * max_token_chars(tokenizer):
        raise too_long(context, "messages", f"over {context}")
    text, stops = render_chat(messages, tokenizer)
    return encode_text(text, tokenizer, context, "messages"), stops
