"""Streamed text: stop strings split over tokens are cut, half characters are held back."""

from __future__ import annotations

import pytest

from course_lib.models.hub import load_tokenizer
from course_lib.serving.detokenizer import IncrementalText


class ByteTokenizer:
    """One token per byte, decoded like a byte-level BPE (broken UTF-8 -> U+FFFD)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stop: list[str] | None = None) -> tuple[list[str], IncrementalText]:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    inc = IncrementalText(tok, stop)
    deltas = [inc.update(ids[:i], finished=i == len(ids)) for i in range(1, len(ids) + 1)]
    return deltas, inc


def test_without_stops_the_deltas_add_up_to_the_text():
    deltas, inc = stream("hello, wörld — ✓")
    assert "".join(deltas) == "hello, wörld — ✓" and not inc.stopped
    assert all("\ufffd" not in d for d in deltas)  # half characters never sent


@pytest.mark.parametrize("text, stop, expected", [
    ("abc\nUser: hi", ["\nUser:"], "abc"),
    ("one two three", ["two", "t"], "one "),  # the earliest stop wins
    ("xyz", ["q"], "xyz"),
    ("stop at the end!", ["!"], "stop at the end"),
])
def test_stop_strings_are_cut_out_even_when_split_over_tokens(text, stop, expected):
    deltas, inc = stream(text, stop)
    assert "".join(deltas) == expected
    assert inc.stopped == (expected != text)
    # nothing of the stop string ever went out, not even its first characters
    sent = ""
    for d in deltas:
        sent += d
        assert all(s not in sent for s in stop)


def test_nothing_after_a_stop():
    tok = ByteTokenizer()
    inc = IncrementalText(tok, ["#"])
    assert inc.update(tok.encode("ab#c")) == "ab" and inc.stopped
    assert inc.update(tok.encode("ab#cdef"), finished=True) == ""


def test_with_the_real_tokenizer():
    tok = load_tokenizer("tiny")
    text = "def f(x):\n    return x  # done\n"
    ids = tok.encode(text)
    inc = IncrementalText(tok, ["# done"])
    out = "".join(inc.update(ids[:i]) for i in range(1, len(ids) + 1))
    assert out == text[:text.index("# done")]
