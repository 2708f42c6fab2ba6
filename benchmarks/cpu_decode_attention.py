"""Question: on a CPU, when does one padded, masked SDPA call for a batch of decodes beat one
call per sequence? (The engine's rule today: ``PADDED_DECODE_MAX_WASTE`` and
``PADDED_DECODE_MAX_KEYS`` in ``course_lib.models.attention``.)

The engine's torch decode path (``course_lib.models.attention.paged_attention``) either pads
every decode of a step to the longest context and runs one masked
``paged_decode_attention_padded`` call, or runs ``paged_prefill_attention`` (one fused,
unmasked SDPA per sequence over its own blocks). This script times both on the same random
paged cache (blocks shuffled, lengths up to a block short of the context) for the tiny model's
heads (6 of 64, MHA) and SmolLM2's (9 query / 3 KV heads of 64), alternating A/B, best of
``--repeats``, and prints the ratio beside the padded keys and whether today's rule takes the
padded call. Outputs are checked equal first. Not part of ``make bench`` (no summary row):
~15 s on its own. Run it more than once: the masked call's time varies from process to
process (measured on the 2-core EPYC: 0.37x in one process and 1.96x in the next for 32 MHA
decodes of 64 tokens), which is why the rule has not been raised yet.

    python benchmarks/cpu_decode_attention.py [--threads 1] [--repeats 3] [--out FILE]
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
from course_lib.models.attention import PADDED_DECODE_MAX_KEYS, PADDED_DECODE_MAX_WASTE

HEADS = {"tiny (6/6 heads)": (6, 6, 64), "smollm2 (9/3 heads)": (9, 3, 64)}
POINTS = [(8, 64), (32, 64), (32, 128), (32, 256), (8, 512), (32, 512)]  # (decodes, context)
BLOCK = 16


def problem(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BLOCK)
    k_cache = torch.randn(batch * per_seq + 1, BLOCK, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq).int()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="A/B rounds; the best of each counts")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{runtime.machine_description()}, {torch.get_num_threads()} thread(s); the engine pads "
          f"when padding reads <= {PADDED_DECODE_MAX_WASTE}x the keys and <= {PADDED_DECODE_MAX_KEYS} keys")
    rows = []
    for name, (heads, kv_heads, head_dim) in HEADS.items():
        for batch, context in POINTS:
            inputs = problem(batch, context, heads, kv_heads, head_dim)
            torch.testing.assert_close(per_sequence(*inputs), paged_decode_attention_padded(*inputs),
                                       atol=1e-4, rtol=1e-4)
            a, b = [], []
            for _ in range(args.repeats):  # alternate A and B
                a.append(microseconds(per_sequence, inputs))
                b.append(microseconds(paged_decode_attention_padded, inputs))
            lens = inputs[-1]
            padded_keys = batch * int(lens.max())
            engine_pads = (padded_keys <= PADDED_DECODE_MAX_WASTE * int(lens.sum())
                           and padded_keys <= PADDED_DECODE_MAX_KEYS)
            row = {"heads": name, "decodes": batch, "context": context, "per_sequence_us": min(a),
                   "padded_us": min(b), "padded_over_per_sequence": min(a) / min(b),
                   "padded_keys": padded_keys, "engine_pads": engine_pads}
            rows.append(row)
            print(f"{name:20s} {batch:3d} decodes x {context:4d}: per-sequence {min(a):7.0f} us, "
                  f"one padded call {min(b):7.0f} us, {row['padded_over_per_sequence']:.2f}x "
                  f"({padded_keys} padded keys; the engine {'pads' if engine_pads else 'goes per sequence'})")
    if args.out:
        args.out.write_text(json.dumps({"machine": runtime.machine_description(),
                                        "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
