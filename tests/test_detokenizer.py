"""Streamed text: stop strings split over tokens are cut, half characters are held back, and
each token costs the same however long the output already is."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.models.hub import load_tokenizer
from course_lib.serving.detokenizer import IncrementalText


class ByteTokenizer:
    """One token per byte, decoded like a byte-level BPE (broken UTF-8 -> U+FFFD)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class CountingTokenizer(ByteTokenizer):
    """A ByteTokenizer that counts how many ids it was asked to decode, in all."""

    def __init__(self):
        self.decoded_ids = 0

    def decode(self, ids: list[int]) -> str:
        self.decoded_ids += len(ids)
        return super().decode(ids)


def stream(text: str, stop: list[str] | None = None) -> tuple[list[str], IncrementalText]:
    """Feed ``text``'s byte tokens one at a time, the last call with ``finished``."""
    tok = ByteTokenizer()
    ids = tok.encode(text)
    inc = IncrementalText(tok, stop)
    deltas = [inc.update([t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    return deltas, inc


def test_without_stops_the_deltas_add_up_to_the_text():
    deltas, inc = stream("hello, wörld — ✓ 😀")
    assert "".join(deltas) == inc.text == "hello, wörld — ✓ 😀" and not inc.stopped
    assert all("\ufffd" not in d for d in deltas)  # half characters never sent
    assert inc.token_ids == list("hello, wörld — ✓ 😀".encode())


def test_a_half_character_waits_for_its_other_half():
    tok = ByteTokenizer()
    inc = IncrementalText(tok)
    e_acute = tok.encode("é")
    assert inc.update(tok.encode("ab")) == "ab"
    assert inc.update(e_acute[:1]) == ""  # half of "é": held back
    assert inc.update([]) == ""  # an empty delta changes nothing
    assert inc.update(e_acute[1:]) == "é"


def test_finishing_flushes_an_incomplete_character():
    tok = ByteTokenizer()
    inc = IncrementalText(tok)
    assert inc.update(tok.encode("ok") + tok.encode("é")[:1]) == "ok"
    assert inc.update([], finished=True) == "\ufffd"  # the model ended mid-character


def test_invalid_bytes_do_not_stall_the_stream():
    """Stray continuation bytes never become a character: they go out as U+FFFD, with the rest."""
    tok = CountingTokenizer()
    inc = IncrementalText(tok)
    out = "".join(inc.update([0x80]) for _ in range(500))
    assert out.count("\ufffd") > 480  # sent while the bytes kept coming
    assert tok.decoded_ids < 100 * 500  # and the window stayed small (no cost growing with n)
    for run in range(20, 30):  # a valid character right after them is still whole, at any phase
        inc = IncrementalText(tok)
        ids = [0x80] * run + tok.encode("😀é!")
        out = "".join(inc.update([t]) for t in ids) + inc.update([], finished=True)
        assert out == tok.decode(ids)


@pytest.mark.parametrize("text, stop, expected", [
    ("abc\nUser: hi", ["\nUser:"], "abc"),
    ("one two three", ["two", "t"], "one "),  # the earliest stop wins
    ("xyz", ["q"], "xyz"),
    ("stop at the end!", ["!"], "stop at the end"),
    ("café ☕ then", ["☕"], "café "),
])
def test_stop_strings_are_cut_out_even_when_split_over_tokens(text, stop, expected):
    deltas, inc = stream(text, stop)
    assert "".join(deltas) == inc.text == expected
    assert inc.stopped == (expected != text)
    # nothing of the stop string ever went out, not even its first characters
    sent = ""
    for d in deltas:
        sent += d
        assert expected.startswith(sent)


def test_the_earliest_stop_wins_whatever_its_place_in_the_list():
    tok = ByteTokenizer()
    inc = IncrementalText(tok, ["two", "e t"])
    assert inc.update(tok.encode("one two three")) == "on" and inc.stopped


def test_a_stop_ends_the_text_as_soon_as_it_is_complete():
    """A shorter stop inside a longer one ends the text when it completes: the tokens that could
    complete the longer one are not generated."""
    deltas, inc = stream("so: xyz", ["xyz", "y"])
    assert "".join(deltas) == "so: x" and inc.stopped


def test_nothing_after_a_stop():
    tok = ByteTokenizer()
    inc = IncrementalText(tok, ["#"])
    assert inc.update(tok.encode("ab#c")) == "ab" and inc.stopped
    assert inc.update(tok.encode("def"), finished=True) == ""
    assert inc.text == "ab"


def test_with_the_real_tokenizer():
    tok = load_tokenizer("tiny")
    text = "def f(x):\n    return x  # café 😀 done\n"
    ids = tok.encode(text)
    inc = IncrementalText(tok, ["done"])
    deltas = [inc.update([t]) for t in ids]
    assert "".join(deltas) == text[:text.index("done")] and inc.stopped
    assert all("\ufffd" not in d for d in deltas)

    inc = IncrementalText(tok)
    out = "".join(inc.update(ids[i:i + 3], finished=i + 3 >= len(ids)) for i in range(0, len(ids), 3))
    assert out == text


def test_the_cost_per_token_is_flat():
    """Decoding the whole output each token decodes ~n^2/2 ids for n tokens; the window, O(n)."""
    tok = CountingTokenizer()
    ids = tok.encode(("The quick brown fox jumps over the lazy dog. " * 50)[:2000])
    inc = IncrementalText(tok, ["\nUser:"])
    out = "".join(inc.update([t], finished=i == len(ids) - 1) for i, t in enumerate(ids))
    assert out == tok.decode(ids)
    assert tok.decoded_ids < 10 * len(ids), f"{tok.decoded_ids} ids decoded for {len(ids)} tokens"


def split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """``ids`` in consecutive pieces at the given cut points (repeated cuts: empty pieces)."""
    bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# any character (no lone surrogates: they are not UTF-8), with extra 2-, 3- and 4-byte ones
texts = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("é€✓中😀🎉")),
                max_size=40)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=texts)
def test_any_split_gives_the_text_up_to_the_first_stop(data, text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=12), label="cuts")
    # stops: pieces of the text (so they do occur) and random strings (which mostly do not)
    pieces = st.tuples(st.integers(0, len(text)), st.integers(1, 4)).map(lambda p: text[p[0]:p[0] + p[1]])
    stop = data.draw(st.lists(st.one_of(pieces, texts), max_size=4), label="stop")

    inc = IncrementalText(tok, stop)
    deltas = [inc.update(piece) for piece in split(ids, cuts)]
    deltas.append(inc.update([], finished=True))
    out = "".join(deltas)

    stops = [s for s in stop if s]
    assert out == inc.text and text.startswith(out)
    assert not any(s in out for s in stops)
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)
    found = [i for i in (text.find(s) for s in stops) if i != -1]
    if not found:
        assert out == text and not inc.stopped
        return
    assert inc.stopped and any(text.startswith(s, len(out)) for s in stops)
    # Which stop ends the text can depend on how the ids were split when one stop sits inside
    # another ("y" in "xyz": "xy" then "z" stops at "y", "xyz" at once at "xyz"). Without such
    # nesting, the earliest occurrence is also the first one completed, whatever the split.
    if not any(a != b and a in b for a in stops for b in stops):
        assert out == text[:min(found)]
