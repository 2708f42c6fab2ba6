"""Token ids -> streamed text, with stop strings cut out.

Streaming text is not just ``decode(new_token)``: a byte-level BPE token can hold half of a
UTF-8 character (decoded as U+FFFD until the rest arrives), and a stop string can arrive split
over several tokens (``"\\nUs"`` then ``"er:"``). So :class:`IncrementalText` decodes the whole
output each time, sends only what can no longer change — it holds back a trailing U+FFFD and,
while stop strings are set, the last ``len(longest stop) - 1`` characters, which might still
turn out to be the start of one — and, when a stop string appears, ends the text just before
it (OpenAI's rule: the stop string is not returned).
"""

from __future__ import annotations


class IncrementalText:
    """Feed it the cumulative output token ids; it returns the new text safe to send."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = 0  # characters of the text already returned
        self.text = ""  # everything returned so far
        self.stopped = False  # a stop string was found: nothing more will be returned

    def update(self, token_ids: list[int], finished: bool = False) -> str:
        """New text since the last call; after a stop string, ``stopped`` is True."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(token_ids)
        cut = min((i for i in (full.find(s) for s in self.stop) if i != -1), default=-1)
        if cut != -1:
            end, self.stopped = cut, True
        elif finished:
            end = len(full)
        else:
            end = len(full.rstrip("\ufffd")) - self.hold
        end = max(end, self.sent)
        delta = full[self.sent:end]
        self.sent = end
        self.text += delta
        return delta
