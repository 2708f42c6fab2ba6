"""Claim: GPTQ and AWQ lose less perplexity than round-to-nearest at 4 and 3 bits.

The papers' ordering on OPT-125M (WikiText-2): FP16 27.65, RTN-4 37.28, GPTQ-4 31.12. The
chapter's table (FP32 25.3 / INT8 25.8 / GPTQ-4bit 25.5 / GPTQ-3bit 26.2) is a claim for a
model it does not name. Measured here, in one run, with the same seeded calibration windows
for every method and the same evaluation tokens (GPTQ's protocol: non-overlapping windows of
the model's context):

- FP32, then RTN, GPTQ, GPTQ with act-order and AWQ at W4 per-channel, W4 g128 and W3 g128:
  perplexity, change vs FP32, size and quantization wall time;
- the targets: at W4 g128 and W3 g128 GPTQ and AWQ each beat RTN, and at W3 g128 GPTQ closes
  at least half of RTN's gap to FP32 (printed as ``gap closed``).

Models (``--models``): SmolLM2-135M-Instruct (LLaMA family, always offline) and the bundled
tiny GPT-2 by default, side by side, so a reader sees what scale and real outliers change;
GPT-2 124M / gpt2-medium / larger SmolLM2s when the hub is reachable. SmolLM2's q/k/v and
gate/up layers are 576 wide, which 128 does not divide: its "g128" rows use the largest
power-of-two group that fits (g64), and the rows and targets are labelled with the group used.

    python benchmarks/quant_quality.py [--quick] [--models smollm2-135m tiny gpt2]

Writes ``benchmarks/results/quant_quality-<machine>.json`` and a bar chart ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from course_lib import runtime
from course_lib.data import calibration_segments, load_text
from course_lib.evaluation.perplexity import encode
from course_lib.evaluation.quant_quality import (
    DEFAULT_CONFIGS,
    find_row,
    gap_closed,
    precision_name,
    quality_sweep,
    quality_table,
    rows_to_dicts,
)
from course_lib.models.families import context_length
from course_lib.models.hub import load_model, resolve
from course_lib.quant.layerwise import fitting_group_size

RESULTS = Path(__file__).resolve().parent / "results"
#: the group size the targets name; a model whose layers it does not divide uses the largest
#: power of two below it that does (see fitting_group_size)
TARGET_GROUP = 128
#: perplexity and calibration windows are the model's context capped here (SmolLM2: 8192)
MAX_WINDOW = 1024


def target_precisions(group_size: int) -> tuple[str, str]:
    return precision_name(4, group_size), precision_name(3, group_size)


def targets(rows, group_size: int = TARGET_GROUP) -> dict:
    """The issue's pass/fail conditions, from the measured rows."""
    out = {}
    w4, w3 = target_precisions(group_size)
    for precision in (w4, w3):
        rtn = find_row(rows, "RTN", precision).perplexity
        for method in ("GPTQ", "AWQ"):
            out[f"{method} < RTN at {precision}"] = find_row(rows, method, precision).perplexity < rtn
    out[f"GPTQ closes >= 1/2 of RTN's gap at {w3}"] = gap_closed(rows, "GPTQ", w3) >= 0.5
    return out


def run_model(name: str, args) -> dict:
    model, tokenizer = load_model(name)
    actual = getattr(model, "course_name", name)
    train, dataset = load_text(args.dataset, "train")
    test, _ = load_text(dataset, "test")
    window = min(context_length(model.config), MAX_WINDOW)
    seq_len = min(args.seq_len, window)
    calibration = calibration_segments(tokenizer, train, args.n_samples, seq_len, seed=args.seed)
    eval_ids = encode(tokenizer, test)[: args.eval_tokens or None]
    group = fitting_group_size(model, TARGET_GROUP)
    awq_options = {"search_tokens": args.awq_search_tokens or None}
    configs = [replace(c, group_size=fitting_group_size(model, c.group_size),
                       options=awq_options if c.method == "awq" else {}) for c in DEFAULT_CONFIGS]
    if args.quick:
        configs = [c for c in configs if c.group_size == group]
    if args.no_act_order:
        configs = [c for c in configs if not c.act_order]
    start = time.perf_counter()
    rows = quality_sweep(model, eval_ids, calibration, configs, max_length=window,
                         progress=not args.no_progress)
    checks = targets(rows, group)
    print(f"\n## {actual} ({dataset}, {eval_ids.numel()} eval tokens in windows of {window}, "
          f"calibration {args.n_samples} x {seq_len}, seed {args.seed})\n")
    if group != TARGET_GROUP:
        print(f"g{TARGET_GROUP} does not divide every layer's input width here: g{group} instead\n")
    print(quality_table(rows))
    measured = {(r.method, r.precision) for r in rows}
    gaps = {}
    for precision in target_precisions(group):
        for method in ("GPTQ", "GPTQ act-order", "AWQ"):
            if (method, precision) in measured:  # act-order is skipped with --no-act-order
                gaps[f"{method} {precision}"] = gap = gap_closed(rows, method, precision)
                print(f"gap to FP32 closed at {precision} by {method}: {gap:.0%}")
    for claim, ok in checks.items():
        print(f"[{'met' if ok else 'NOT met'}] {claim}")
    return {"model": actual, "dataset": dataset, "eval_tokens": int(eval_ids.numel()),
            "window": window, "group_size": group,
            "calibration": {"n_samples": args.n_samples, "seq_len": seq_len, "seed": args.seed,
                            "awq_search_tokens": args.awq_search_tokens},
            "rows": rows_to_dicts(rows), "targets": checks,
            "gap_closed": gaps,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"],
                        help="hub names fall back offline (GPT-2s to tiny, LLaMAs to smollm2-135m); "
                             "duplicates are measured once")
    parser.add_argument("--dataset", choices=("auto", "wikitext2", "stdlib"), default="auto")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="calibration windows (default 64, --quick 32; GPTQ used 128; 64 keeps a CPU run short)")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 512, --quick 256)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="default 32768, --quick 16384; 0 = the whole test text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--awq-search-tokens", type=int, default=1024,
                        help="calibration tokens AWQ's ratio search replays (its 20 block runs per "
                             "group dominate a CPU run: ~2.5 min per 512 tokens on SmolLM2-135M); "
                             "0 = all (default 1024)")
    parser.add_argument("--quick", action="store_true",
                        help="g128 only, 32 x 256 calibration, 16k eval tokens (unless given)")
    parser.add_argument("--no-act-order", action="store_true",
                        help="skip GPTQ act-order (no target is stated for it)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    for name, full, quick in (("n_samples", 64, 32), ("seq_len", 512, 256), ("eval_tokens", 32768, 16384)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    runtime.seed_everything(args.seed)
    names = list(dict.fromkeys(resolve(name)[0] for name in args.models))  # offline: all -> tiny, once
    results = [run_model(name, args) for name in names]
    payload = {"benchmark": "quant_quality", "machine": runtime.machine_description(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "device": str(runtime.get_device()), "quick": args.quick,
               "settings": {**vars(args), "out": str(args.out) if args.out else None}, "results": results}
    out = runtime.write_result("quant_quality", payload, RESULTS, args.out)
    try:
        from course_lib.viz import plot_quant_quality

        for result in results:
            fig = plot_quant_quality(result["rows"], f"{result['model']} on {payload['machine']}")
            fig.savefig(out.with_name(out.stem + f"-{result['model']}.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot written")


if __name__ == "__main__":
    main()
