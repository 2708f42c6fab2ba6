"""Claim (the chapter's): a KV cache makes generation about 50x faster.

The chapter counts token-forwards: without a cache, generating 100 tokens runs the model over
1 + 2 + ... + 100 = 5050 tokens; with one, over 100; 5050 / 100 = 50.5. That count is exact for
a 1-token prompt, but it is not a constant: it grows roughly as n/2 with the number of new
tokens n (and ~n when the prompt is long), attention alone grows one power faster, and a
clock does not follow a FLOP count when one-token steps use the hardware poorly.

Measured here, in one run, on the default model (the bundled tiny model offline or in fast
mode, GPT-2 when the hub is reachable), batch 1, greedy, both loops of
``course_lib.generation.generate`` for 64, 100 (the chapter's example), 256 and the maximum
number of new tokens the context allows (context - prompt length):

- tokens/s of each loop and their ratio (the measured speed-up); the two loops' tokens are
  checked to be identical. Each loop runs once (per repeat) up to the largest size; step s does
  the same work whatever follows, so the time for n tokens is the sum of the first n steps;
- per-token latency against position (how each step's cost grows with the sequence);
- the analytic FLOP ratio of the two loops (``decode_flops``) beside the measured ratio, and
  the chapter's 50x beside the measurement at 100 new tokens, with a one-line explanation.

    python benchmarks/kv_cache.py [--quick] [--new-tokens 64 100 256 max] [--repeats 1]

Writes ``benchmarks/results/kv_cache-<machine>.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import transformers

from course_lib import runtime
from course_lib.generation.generate import (
    decode_flops,
    generate_no_cache,
    generate_with_cache,
)
from course_lib.models.gpt import GPT
from course_lib.models.hub import default_model, load_model

RESULTS = Path(__file__).resolve().parent / "results"
CHAPTER_SPEEDUP, CHAPTER_NEW_TOKENS = 50.0, 100


def parse_sizes(values: list[str], max_new: int) -> list[int]:
    sizes = []
    for v in values:
        n = max_new if v == "max" else int(v)
        if not 1 <= n <= max_new:
            raise SystemExit(f"--new-tokens: {n} is outside [1, {max_new}] (context - prompt length)")
        sizes.append(n)
    return sorted(set(sizes))


def run_loop(loop, model, prompt: torch.Tensor, n: int, repeats: int):
    """Per-step seconds (median over ``repeats`` runs of ``n`` new tokens) and the tokens."""
    runs = [loop(model, prompt, n, step_times=True) for _ in range(repeats)]
    steps = [statistics.median(r.step_seconds[i] for r in runs) for i in range(n)]
    return steps, runs[0].tokens


def explain(row: dict) -> str:
    """One line on why the measured speed-up differs from the FLOP ratio.

    Identity: measured speed-up = FLOP ratio x (cached loop's achieved FLOP/s) / (no-cache
    loop's achieved FLOP/s), so the gap is how much worse one-token steps use the hardware.
    """
    nc, c = row["no_cache_gflop_per_s"], row["cached_gflop_per_s"]
    why = ("one-token steps are bound by fixed per-step costs (Python, kernel launches) and by "
           "reading every weight once per token, while re-running the sequence feeds big batched "
           "matmuls" if c < nc else
           "the long no-cache forwards are slower per FLOP (attention's memory traffic grows with "
           "the square of the sequence)")
    return (f"measured {row['measured_speedup']:.1f}x vs analytic {row['flop_ratio']:.1f}x: the "
            f"cached loop achieves {c:.2f} GFLOP/s, the no-cache loop {nc:.2f} GFLOP/s; {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: course_lib's default_model()")
    parser.add_argument("--impl", choices=("course", "hf"), default="course",
                        help="course_lib.models.gpt.GPT (default) or the HF GPT2LMHeadModel")
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--new-tokens", nargs="+", default=["64", "100", "256", "max"],
                        help="numbers of new tokens; 'max' = context - prompt length")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="new tokens 16 and 64, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = ["16", "64"], 1

    runtime.seed_everything(0)
    hf, _ = load_model(args.model or default_model(), device=runtime.get_device())
    model = GPT.from_hf(hf) if args.impl == "course" else hf
    config, device = hf.config, next(hf.parameters()).device
    max_new = config.n_positions - args.prompt_len
    sizes = parse_sizes(args.new_tokens, max_new)
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    for loop in (generate_no_cache, generate_with_cache):  # warm-up
        loop(model, prompt, 8)

    # Step s does the same work however many steps follow, so one run per loop up to the largest
    # size gives every size: the time for n new tokens is the sum of the first n step times.
    n_max = sizes[-1]
    nc_all, nc_tokens = run_loop(generate_no_cache, model, prompt, n_max, args.repeats)
    c_all, c_tokens = run_loop(generate_with_cache, model, prompt, n_max, args.repeats)
    same_tokens = bool(torch.equal(nc_tokens, c_tokens))
    per_step = {"positions": list(range(args.prompt_len, args.prompt_len + n_max)),
                "no_cache_ms": [1000 * t for t in nc_all], "cached_ms": [1000 * t for t in c_all]}
    rows = []
    for n in sizes:
        nc_steps, c_steps = nc_all[:n], c_all[:n]
        nc_s, c_s = sum(nc_steps), sum(c_steps)
        flops_nc = decode_flops(config, args.prompt_len, n, cached=False)
        flops_c = decode_flops(config, args.prompt_len, n, cached=True)
        rows.append({
            "new_tokens": n,
            "no_cache_seconds": nc_s, "cached_seconds": c_s,
            "no_cache_tokens_per_s": n / nc_s, "cached_tokens_per_s": n / c_s,
            "measured_speedup": nc_s / c_s,
            "flop_ratio": flops_nc.total / flops_c.total,
            "token_forward_ratio": flops_nc.token_forwards / flops_c.token_forwards,
            "attention_pair_ratio": flops_nc.attention_pairs / flops_c.attention_pairs,
            "no_cache_gflops": flops_nc.total / 1e9, "cached_gflops": flops_c.total / 1e9,
            "no_cache_gflop_per_s": flops_nc.total / 1e9 / nc_s,
            "cached_gflop_per_s": flops_c.total / 1e9 / c_s,
            "same_tokens": bool(torch.equal(nc_tokens[:, :n], c_tokens[:, :n])),
            # decode steps only (the cached loop's step 0 is the prefill)
            "cached_ms_per_decode_step": 1000 * statistics.median(c_steps[1:] or c_steps),
            "no_cache_ms_last_step": 1000 * nc_steps[-1],
        })
        r = rows[-1]
        print(f"{n:4d} new tokens: no cache {r['no_cache_tokens_per_s']:7.1f} tok/s, cache "
              f"{r['cached_tokens_per_s']:7.1f} tok/s -> measured {r['measured_speedup']:5.1f}x | "
              f"analytic FLOP ratio {r['flop_ratio']:5.1f}x (token-forwards "
              f"{r['token_forward_ratio']:.1f}x, attention pairs {r['attention_pair_ratio']:.1f}x)"
              f" | same tokens: {r['same_tokens']}")

    biggest = rows[-1]
    line = explain(biggest)
    chapter_row = next((r for r in rows if r["new_tokens"] == CHAPTER_NEW_TOKENS), None)
    chapter = {
        "claim": f"KV cache = {CHAPTER_SPEEDUP:.0f}x",
        "chapter_count": "1 + 2 + ... + 100 = 5050 token-forwards vs 100 (1-token prompt): 50.5x",
        "token_forward_ratio_1_token_prompt": decode_flops(config, 1, CHAPTER_NEW_TOKENS, False).token_forwards
        / decode_flops(config, 1, CHAPTER_NEW_TOKENS, True).token_forwards,
        "measured_speedup_at_100": chapter_row and chapter_row["measured_speedup"],
        "claim_met_at_100": chapter_row and chapter_row["measured_speedup"] >= CHAPTER_SPEEDUP,
        "flop_ratio_at_100": chapter_row and chapter_row["flop_ratio"],
        "explanation": line,
    }
    result = {
        "benchmark": "kv_cache",
        "claim": chapter["claim"],
        "machine": runtime.machine_description(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "model": hf.course_name, "model_source": hf.course_source, "impl": args.impl,
        "parameters": sum(p.numel() for p in hf.parameters()),
        "context": config.n_positions,
        "settings": {**vars(args), "out": str(args.out) if args.out else None, "new_tokens": sizes},
        "same_tokens": same_tokens,
        "rows": rows,
        "per_step": per_step,
        "chapter": chapter,
    }
    if chapter_row:
        print(f"chapter: {chapter['claim']} at 100 new tokens; measured here "
              f"{chapter_row['measured_speedup']:.1f}x, analytic FLOP ratio "
              f"{chapter_row['flop_ratio']:.1f}x ({hf.course_name}, prompt {args.prompt_len}, "
              f"{result['machine']})")
    print(f"why (at {biggest['new_tokens']} new tokens): {line}")
    runtime.write_result("kv_cache", result, RESULTS, args.out)


if __name__ == "__main__":
    main()
