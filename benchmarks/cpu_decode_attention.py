"""Question: on a CPU, how should a step's decodes be batched into attention calls? The engine's
rule: ``decode_groups`` in ``course_lib.models.attention`` (``PADDED_DECODE_MAX_KEYS`` keys and
``PADDED_DECODE_MAX_WASTE`` padding per group).

The engine's torch decode path (``course_lib.models.attention.paged_attention``) cuts the
step's decodes, in order, into groups and runs one padded, masked
``paged_decode_attention_padded`` call per group. This script times, on the same random paged
cache (blocks shuffled; lengths a block short of the context or, for "ragged" points, uniform
between 1 and the context), for the tiny model's heads (6 of 64, MHA) and SmolLM2's (9 query / 3
KV heads of 64), alternating, best of ``--repeats``:

- one unmasked call per sequence (``paged_prefill_attention``: the engine's path before issue 22
  for any step whose decodes held more than 1024 keys);
- one padded call for all decodes (no cap);
- the engine's groups at each ``--max-keys`` (the first is the engine's default).

Outputs are checked equal first. Not part of ``make bench`` (no summary row): ~30 s alone.
Measured on the 2-core EPYC (1 thread): the one call's time varies from process to process
(0.37x in one run, 1.96x in the next for 32 MHA decodes of 64 tokens) and it loses at long
contexts, where its gathered copy of every K/V no longer stays in cache; groups of a few
thousand keys keep most of the one call's gain at short contexts without that loss.

    python benchmarks/cpu_decode_attention.py [--threads 1] [--repeats 3]
                                              [--max-keys 4096 1024 2048 8192] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from course_lib import runtime
from course_lib.kernels.paged_attention import (
    paged_decode_attention_padded,
    paged_prefill_attention,
)
from course_lib.models.attention import PADDED_DECODE_MAX_KEYS, decode_groups

HEADS = {"tiny (6/6 heads)": (6, 6, 64), "smollm2 (9/3 heads)": (9, 3, 64)}
POINTS = [(8, 64), (32, 64), (32, 128), (32, 256), (8, 512), (32, 512)]  # (decodes, context)
RAGGED = [(32, 256), (32, 1024)]  # lengths uniform in 1..context
BLOCK = 16


def problem(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0,
            ragged: bool = False):
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BLOCK)
    k_cache = torch.randn(batch * per_seq + 1, BLOCK, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq).int()
    if ragged:
        lens = torch.randint(1, context + 1, (batch,), generator=gen).int()
    else:
        lens = (context - torch.randint(0, BLOCK, (batch,), generator=gen)).int()
    return torch.randn(batch, heads, head_dim, generator=gen), k_cache, v_cache, tables, lens


def per_sequence(q, k_cache, v_cache, tables, lens):
    ones = torch.ones(len(lens), dtype=torch.int32)
    return paged_prefill_attention(q, k_cache, v_cache, tables, lens, ones, validate=False)


def microseconds(fn, args, calls: int = 20) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6


def grouped(max_keys: int):
    """The engine's decode path at this key cap: one padded call per group."""
    def run(q, k_cache, v_cache, tables, lens):
        groups = decode_groups(lens.tolist(), max_keys)
        return torch.cat([paged_decode_attention_padded(q[a:b], k_cache, v_cache, tables[a:b],
                                                        lens[a:b], max_context=longest)
                          for a, b, longest in groups])
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="A/B rounds; the best of each counts")
    parser.add_argument("--max-keys", type=int, nargs="+",
                        default=[PADDED_DECODE_MAX_KEYS, 1024, 2048, 8192],
                        help="group key caps to time (the first is reported as the engine's)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{runtime.machine_description()}, {torch.get_num_threads()} thread(s); speed-ups over one "
          f"call per sequence (>1 = faster); the engine's cap is {PADDED_DECODE_MAX_KEYS} keys")
    ways = {"one call": paged_decode_attention_padded,
            **{f"groups<={k}": grouped(k) for k in args.max_keys}}
    rows = []
    points = [(b, c, False) for b, c in POINTS] + [(b, c, True) for b, c in RAGGED]
    for name, (heads, kv_heads, head_dim) in HEADS.items():
        for batch, context, ragged in points:
            inputs = problem(batch, context, heads, kv_heads, head_dim, ragged=ragged)
            want = per_sequence(*inputs)
            for fn in ways.values():
                torch.testing.assert_close(fn(*inputs), want, atol=1e-4, rtol=1e-4)
            times: dict[str, list[float]] = {"per sequence": [], **{w: [] for w in ways}}
            for _ in range(args.repeats):  # alternate
                times["per sequence"].append(microseconds(per_sequence, inputs))
                for way, fn in ways.items():
                    times[way].append(microseconds(fn, inputs))
            base = min(times["per sequence"])
            row = {"heads": name, "decodes": batch, "context": context, "ragged": ragged,
                   "per_sequence_us": base,
                   "speedup": {w: base / min(t) for w, t in times.items() if w != "per sequence"},
                   "engine_groups": len(decode_groups(inputs[-1].tolist()))}
            rows.append(row)
            print(f"{name:20s} {batch:3d} x {context:4d}{' ragged' if ragged else '       '}: "
                  f"per sequence {base:7.0f} us; " + ", ".join(
                      f"{w} {x:.2f}x" for w, x in row["speedup"].items())
                  + f" (engine: {row['engine_groups']} calls)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": runtime.machine_description(),
                                        "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
