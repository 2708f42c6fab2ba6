"""Claim: streamed detokenization costs the same per token whatever the output's length:
``course_lib.serving.detokenizer.IncrementalText``'s mean time per token at 4,000 output tokens
is < 2x its time at 250 tokens, while decoding the whole output at every token (the simple way,
and the detokenizer's previous implementation) grows with the length.

With the bundled tiny tokenizer (``load_tokenizer("tiny")``, a byte-level BPE) and a chat-like
answer (prose, code, a few accented letters and emoji) repeated to 4,000 tokens, both ways are
fed one token at a time, with the stop list ``["\\nUser:"]`` (which the text never contains, so
every token is processed):

- old: after every token, decode the whole output, look for the stop strings in all of it, and
  send what can no longer change (hold back a trailing U+FFFD and ``len(stop) - 1`` characters);
- new: ``IncrementalText`` (vLLM's prefix/read-offset window; stop strings searched for in the
  unsent tail only).

For output lengths 250, 1,000 and 4,000 it reports the mean microseconds per token of a whole
stream of that length (the best of ``--repeats`` runs: the machine is shared) and, per way, the
ratio cost@4000 / cost@250. Both ways' texts are checked to be identical.

    python benchmarks/detokenize.py [--repeats 3] [--no-fail] [--out PATH]

Writes ``benchmarks/results/detokenize-<machine>.json``. Exits 1 when the new way's ratio is
>= 2 (unless ``--no-fail``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from course_lib import runtime
from course_lib.models.hub import load_tokenizer
from course_lib.serving.detokenizer import IncrementalText

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (250, 1000, 4000)
STOP = ["\nUser:"]
TARGET_RATIO = 2.0
ANSWER = """Sure! Here is how to read a file line by line in Python, and why it works:

```python
def count_words(path):
    counts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:  # the file is read lazily, one line at a time
            for word in line.split():
                counts[word] = counts.get(word, 0) + 1
    return counts
```

The `with` block closes the file even when an exception is raised. For a café's menu in
French (crème brûlée, déjà vu), the encoding matters: without `encoding="utf-8"` the default
depends on the machine. Temperatures like 21 °C or prices like 4,50 € also need it ✓. 😀

"""


def old_stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[str, float]:
    """The quadratic baseline: decode the whole output at every token. Returns (text, seconds)."""
    hold = max((len(s) for s in stop), default=1) - 1
    sent, pieces = 0, []
    start = time.perf_counter()
    for n in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:n])
        cut = min((i for i in (full.find(s) for s in stop) if i != -1), default=-1)
        if cut != -1:
            end = cut
        elif n == len(ids):
            end = len(full)
        else:
            end = len(full.rstrip("\ufffd")) - hold
        end = max(end, sent)
        pieces.append(full[sent:end])
        sent = end
        if cut != -1:
            break
    return "".join(pieces), time.perf_counter() - start


def new_stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[str, float]:
    """``IncrementalText`` fed one token at a time. Returns (text, seconds)."""
    inc = IncrementalText(tokenizer, stop)
    last = len(ids) - 1
    start = time.perf_counter()
    for i, t in enumerate(ids):
        inc.update([t], finished=i == last)
        if inc.stopped:
            break
    return inc.text, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per (way, length); the best counts")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when the claim is not met")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()

    tok = load_tokenizer("tiny")
    one = tok.encode(ANSWER)
    ids = (one * (max(LENGTHS) // len(one) + 1))[:max(LENGTHS)]
    assert not any(s in tok.decode(ids) for s in STOP), "the text must not contain the stop string"

    rows = []
    print(f"{'tokens':>7} {'old us/token':>13} {'new us/token':>13}")
    for n in LENGTHS:
        old_times, new_times = [], []
        for _ in range(args.repeats):
            old_text, t_old = old_stream(tok, ids[:n], STOP)
            new_text, t_new = new_stream(tok, ids[:n], STOP)
            if old_text != new_text:
                raise SystemExit(f"at {n} tokens the two ways' texts differ")
            old_times.append(t_old)
            new_times.append(t_new)
        row = {"tokens": n, "old_us_per_token": min(old_times) / n * 1e6,
               "new_us_per_token": min(new_times) / n * 1e6}
        rows.append(row)
        print(f"{n:>7} {row['old_us_per_token']:>13.1f} {row['new_us_per_token']:>13.1f}")

    first, last = rows[0], rows[-1]
    old_ratio = last["old_us_per_token"] / first["old_us_per_token"]
    new_ratio = last["new_us_per_token"] / first["new_us_per_token"]
    met = new_ratio < TARGET_RATIO
    print(f"cost@{last['tokens']} / cost@{first['tokens']}: old {old_ratio:.2f}x, new {new_ratio:.2f}x")
    print(f"[{'PASS' if met else 'FAIL'}] new per-token cost ratio {new_ratio:.2f} < {TARGET_RATIO:g} "
          f"(flat in output length)")

    result = {
        "benchmark": "detokenize",
        "claim": (f"IncrementalText's mean time per token at {last['tokens']} output tokens is "
                  f"< {TARGET_RATIO:g}x its time at {first['tokens']} tokens"),
        "machine": runtime.machine_description(),
        "settings": {"repeats": args.repeats, "tokenizer": "tiny", "stop": STOP, "lengths": list(LENGTHS),
                     "out": str(args.out) if args.out else None},
        "rows": rows, "old_ratio": old_ratio, "new_ratio": new_ratio, "target_met": met,
    }
    runtime.write_result("detokenize", result, RESULTS, args.out)
    return 0 if met or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
