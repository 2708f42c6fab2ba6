"""Question (issue 22): does compiling the engine's decode step pay on this machine?

``LLMEngine(compile_decode=True)`` runs decode-only steps through ``torch.compile`` (Inductor:
generated C++ on a CPU; see ``course_lib.serving.compiled_decode``). It pads the batch to a bucket
and the block tables to a power-of-two width, so each step does some work the eager engine does
not, and saves Python and dispatch overhead per op. This script answers with measurements: for
each model of ``--models`` (default tiny) and each batch of ``--batches`` concurrent requests
(default 1 8 32; prompts of 16..63 random token ids, ``--new-tokens`` greedy tokens each,
``ignore_eos``), the eager engine and the compiled one (compiled and warmed first, not timed)
run the same requests, alternating, best of ``--repeats``; outputs must be identical. Prints
seconds per run and the compiled speed-up (>1: compiling pays), and the compile time.

    python benchmarks/compiled_decode.py [--models tiny smollm2-135m] [--batches 1 8 32]
                                         [--new-tokens 48] [--repeats 3] [--threads N]

Writes ``benchmarks/results/compiled_decode-<machine>.json``. Not part of ``make bench`` (no
summary row); the engine keeps eager as its default unless this says otherwise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from course_lib import runtime
from course_lib.models.hub import load_model
from course_lib.serving.compiled_decode import compile_unavailable
from course_lib.serving.engine import LLMEngine, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def timed_generate(engine: LLMEngine, prompts, params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = engine.generate(prompts, params, progress=False)
    return time.perf_counter() - start, [o.output_token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: runtime.cpu_threads, shared)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    runtime.use_cpu_threads(args.threads, shared=True)
    reason = compile_unavailable(runtime.get_device())
    if reason is not None:
        print(f"compiled decode cannot run here: {reason}")
        return 0
    print(f"{runtime.machine_description()}, {torch.get_num_threads()} thread(s)", flush=True)
    rows = []
    for name in args.models:
        model, tokenizer = load_model(name, device=runtime.get_device())
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        eager = LLMEngine(model, tokenizer, max_num_seqs=max(args.batches), max_num_batched_tokens=2048)
        compiled = LLMEngine(model, tokenizer, max_num_seqs=max(args.batches),
                             max_num_batched_tokens=2048, compile_decode=True)
        start = time.perf_counter()
        compiled.warm_up()
        compile_s = time.perf_counter() - start
        print(f"{name}: compiled the decode step in {compile_s:.1f} s", flush=True)
        for batch in args.batches:
            prompts = [torch.randint(1, vocab, (int(torch.randint(16, 64, (1,), generator=gen)),),
                                     generator=gen).tolist() for _ in range(batch)]
            _, want = timed_generate(eager, prompts, params)  # warm both on these shapes
            _, got = timed_generate(compiled, prompts, params)
            if got != want:
                raise SystemExit(f"{name}, batch {batch}: compiled outputs differ from eager")
            best = {"eager": float("inf"), "compiled": float("inf")}
            for _ in range(args.repeats):  # alternate
                for label, engine in (("eager", eager), ("compiled", compiled)):
                    best[label] = min(best[label], timed_generate(engine, prompts, params)[0])
            row = {"model": name, "batch": batch, "eager_s": best["eager"],
                   "compiled_s": best["compiled"], "speedup": best["eager"] / best["compiled"],
                   "compile_s": compile_s, "still_compiled": compiled.compiled is not None}
            rows.append(row)
            print(f"{name:14s} batch {batch:3d}: eager {best['eager']:.3f} s, compiled "
                  f"{best['compiled']:.3f} s -> {row['speedup']:.2f}x", flush=True)
    runtime.write_result("compiled_decode", {"machine": runtime.machine_description(),
                                             "threads": torch.get_num_threads(),
                                             "new_tokens": args.new_tokens, "rows": rows},
                         RESULTS, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
