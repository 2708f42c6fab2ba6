"""Token ids -> streamed text, with stop strings cut out, at a flat cost per token.

Streaming text is not just ``decode(new_token)``, for two reasons:

- A byte-level BPE token can hold half of a UTF-8 character: ``"é"`` may be two tokens, and
  decoding only the first gives U+FFFD (the replacement character) until the second arrives.
  Text sent to a client cannot be taken back, so a half character must never go out.
- A stop string can arrive split over several tokens (``"\\nUs"`` then ``"er:"``), and by
  OpenAI's rule the text ends just before the stop string, which itself is never returned, not
  even its first characters.

The simple fix is to decode the *whole* output after every token and send what changed. That is
correct but quadratic: token n decodes n ids, so a 4,000-token answer decodes ~8 million ids,
and the server's time per token grows with the length of the answer. :class:`IncrementalText`
does what vLLM's incremental detokenizer does instead: it decodes only a small *window* of ids,
``ids[prefix_offset:]``, and compares it with the decode of the window's already-sent part,
``ids[prefix_offset:read_offset]``. Why not decode the new token alone? Because a token's text
can depend on its neighbours (a half character, or a tokenizer that drops a leading space at
the start of a decode); the few tokens of already-sent context make the decode of the window
agree with what decoding the whole output would say. The characters the window has beyond its
prefix are new; if the window ends in U+FFFD the last character is not complete yet, and the
window waits for more ids. On normal text the window is a few tokens long, so every token costs
the same whatever the output's length.

Stop strings are searched for the same way: only in the text not sent yet (the held-back tail
plus the new characters), never in the whole text. While stop strings are set, the last
``len(longest stop) - 1`` characters are held back, since they might be the start of a stop string.

Special tokens (a chat model's end-of-turn ``<|im_end|>``, ``<|endoftext|>``, ...) are control
signals, not text: they are left out of the text, as vLLM's default ``skip_special_tokens=True``
does, so the token that ends a chat turn (counted in ``usage.completion_tokens``) never shows up
in the answer. They are dropped before decoding, which gives what ``decode(ids,
skip_special_tokens=True)`` gives, with any tokenizer.
"""

from __future__ import annotations

import weakref

REPLACEMENT = "\ufffd"  # what decode gives for bytes that are not (yet) a whole UTF-8 character
# A UTF-8 character is at most 4 bytes, and a byte-level token holds at least one byte, so a
# character still being completed lies in the last 3 tokens. A window this many tokens past its
# read offset that still ends in U+FFFD holds bytes no later token can turn into a character:
# invalid UTF-8 from the model (e.g. a stray continuation byte). Its U+FFFDs are sent rather than
# waiting for ever, which would let the window, and the cost of every later token, grow without
# bound.
MAX_PENDING = 8

_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ids


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids ``tokenizer.decode(ids, skip_special_tokens=True)`` leaves out: its special tokens
    (``all_special_ids``) and every added token marked special (``added_tokens_decoder``)."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that takes no weak reference
        pass
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    found = frozenset(ids)
    try:
        _SPECIAL_IDS[tokenizer] = found
    except TypeError:
        pass
    return found


class IncrementalText:
    """Feed it the token ids generated since the last call; it returns the new text safe to send.

    ``token_ids`` holds every id fed so far (less the special ones, unless
    ``skip_special_tokens=False``), ``text`` everything returned so far, and ``stopped`` turns
    True when a stop string is found (later calls then return ``""``).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.stopped = False  # a stop string was found: nothing more will be returned
        # vLLM's window: ids[prefix_offset:read_offset] were decoded and sent already (kept as
        # context); ids[read_offset:] are not turned into text yet.
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # decoded but held back: it might be the start of a stop string
        self._pieces: list[str] = []  # the deltas returned, joined only when ``text`` is read

    @property
    def text(self) -> str:
        """Everything returned so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def update(self, new_token_ids: list[int], finished: bool = False) -> str:
        """Feed the ids generated since the last call (may be empty); return the new text to send."""
        if self.stopped:
            return ""
        if self.skip:
            new_token_ids = [t for t in new_token_ids if t not in self.skip]
        self.token_ids.extend(new_token_ids)
        chars = self._new_chars(finished) if new_token_ids or finished else ""
        delta = self._cut_stops(chars, finished)
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end])

    def _advance(self, text: str, prefix_len: int, end: int) -> str:
        """Accept ``text`` (the decode of ids[prefix_offset:end]); slide the window to ``end``."""
        self.prefix_offset, self.read_offset = self.read_offset, end
        return text[prefix_len:]

    def _new_chars(self, finished: bool) -> str:
        """The characters the ids fed so far add to the text, holding back half characters."""
        n = len(self.token_ids)
        prefix_len = len(self._decode(self.prefix_offset, self.read_offset))
        new_text = self._decode(self.prefix_offset, n)
        if finished or (len(new_text) > prefix_len and not new_text.endswith(REPLACEMENT)):
            return self._advance(new_text, prefix_len, n)  # when finished: flush, U+FFFD and all
        # The window ends mid-character. If several ids came at once, the ones before that
        # character are whole: find the last clean end among the last 3 ids (see MAX_PENDING).
        for end in range(n - 1, max(self.read_offset, n - 4), -1):
            text = self._decode(self.prefix_offset, end)
            if len(text) > prefix_len and not text.endswith(REPLACEMENT):
                return self._advance(text, prefix_len, end)
        if n - self.read_offset > MAX_PENDING:  # invalid bytes: send them, keep the last 4 ids
            return self._advance(self._decode(self.prefix_offset, n - 4), prefix_len, n - 4)
        return ""  # nothing new yet: wait for the rest of the character

    def _cut_stops(self, chars: str, finished: bool) -> str:
        """Of ``pending + chars``, what can be sent; ends the text at the earliest stop string."""
        if not self.stop:
            return chars
        # Search only the unsent tail. An occurrence of a stop string cannot start in text sent
        # already: one that ended in an earlier call was found then (and we stopped), so a new
        # one ends in ``chars``; it is at most hold + 1 characters long, so it starts at most
        # ``hold`` characters before ``chars``, inside ``pending``, which is exactly the last
        # ``hold`` characters decoded so far (or all of them, while fewer have been decoded).
        tail = self.pending + chars
        cut = min((i for i in (tail.find(s) for s in self.stop) if i != -1), default=-1)
        if cut != -1:  # the earliest occurrence across all stop strings wins
            self.stopped, self.pending = True, ""
            return tail[:cut]
        if finished:  # nothing more can come: flush what was held back
            self.pending = ""
            return tail
        keep = min(self.hold, len(tail))
        self.pending = tail[len(tail) - keep:]
        return tail[:len(tail) - keep]
