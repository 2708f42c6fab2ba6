"""Run every benchmark of one set, then write the summary of headline ratios.

``make bench`` runs the CPU set: the benchmarks that time something on any machine, each with
the arguments below (chosen so that the whole set takes about 23 minutes on a quiet 2-core CPU
while every headline claim is still measured as its script defines it). ``make bench-gpu`` runs
the GPU set (``--gpu``): the Triton kernel benchmarks, which only time on a CUDA device; without
one it prints a single line saying so and runs nothing (exit status 0, or 1 with
``--require-cuda``).

Each benchmark runs as its own process (``python benchmarks/<name>.py ARGS --out
RESULTS/<name>-<machine>.json``), its output shown as it comes, then its wall time. After the
last one, ``benchmarks/summary.py`` writes ``RESULTS/<machine>.json`` and ``RESULTS/<machine>.md``
from every result file of this machine in RESULTS. A benchmark that fails (non-zero exit) does
not stop the others; the summary is still written, and the exit status is then 1. A claim that
is measured but not met is not a failure: the summary's "met" column says so.

    python benchmarks/run_all.py [--gpu] [--quick] [--results DIR] [--only NAME ...] [--dry-run]

``--quick`` runs every benchmark with smoke-test settings (about 5 minutes on 2 cores) to check
the pipeline; its numbers are not the claims' measurements, so without ``--results`` it writes
to a new temporary folder rather than over ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import summary  # noqa: E402  (benchmarks/summary.py, beside this file)

# name -> arguments for `make bench`, and why (estimated wall time on a quiet 2-core EPYC).
CPU_SET: dict[str, list[str]] = {
    # median of 3 runs per model instead of 5; ~30 s
    "tiny_pair_speed": ["--repeats", "3"],
    # the bundled tiny model whatever the network (GPT-2 without a cache on a CPU takes long);
    # 64, 100 (the chapter's example) and 256 new tokens: the context's maximum (500) would add
    # ~30 s of no-cache loop; ~25 s
    "kv_cache": ["--model", "tiny", "--new-tokens", "64", "100", "256"],
    # the bundled pair, the default prompts (3 code + 3 English) and 64 new tokens, 2 interleaved
    # repeats instead of 3; ~100 s
    "speculative": ["--target", "tiny", "--draft", "tiny-draft", "--repeats", "2"],
    # SmolLM2-135M (the headline: 16 requests, 16..128 + 16..128 tokens, sized for its ~10x
    # costlier steps) then the tiny model (64 requests, 16..256 + 16..256), best of 2 alternating
    # runs of each system per model, without the HF generate row, which is no headline and costs
    # ~70 s on tiny alone; ~5 min (SmolLM2 ~2.5, tiny ~3)
    "engine": ["--models", "smollm2-135m", "tiny", "--no-hf", "--no-progress"],
    # SmolLM2-135M-Instruct (offline, LLaMA family) beside the tiny GPT-2, on stdlib text (what
    # every machine has); the precisions the targets name (W4 and W3 at g128, g64 on SmolLM2
    # whose 576-wide layers 128 does not divide) with RTN, GPTQ and AWQ (not act-order: no
    # target), 16 x 256 calibration tokens, 4096 evaluation tokens in windows of 1024; AWQ's
    # ratio search replays 256 tokens (its 80 block runs per block dominate on a CPU). The full
    # grid (`python benchmarks/quant_quality.py`, ~25 min) is in results/; ~8 min
    "quant_quality": ["--models", "smollm2-135m", "tiny", "--dataset", "stdlib", "--quick",
                      "--no-act-order", "--n-samples", "16", "--seq-len", "256", "--eval-tokens",
                      "4096", "--awq-search-tokens", "256", "--no-progress"],
    # the sweep on SmolLM2-135M (32 output tokens, at most 16 requests per level: level 32 cut)
    # then on the tiny model (64 output tokens, levels 1..32), 8 s per concurrency level instead
    # of 20; per model the 2 extra alternating c=1 / c=8 runs are kept, and the two 60 s soaks of
    # 128 clients (plain, hostile) on the tiny model's --max-queue 8 server; an unmet check is
    # reported, not an error; ~7 min (sweeps ~2.5 + ~1.5, soaks ~2.5)
    "serve": ["--models", "smollm2-135m", "tiny", "--duration", "8", "--no-fail"],
}
GPU_SET: dict[str, list[str]] = {
    "quant_kernels": [],  # every shape, M = 1, 16, 256
    "paged_attention": [],  # batch {1, 8, 32, 128} x context {512, 2048, 8192}
}
# smoke-test settings: every code path, tiny sizes (numbers meaningless)
QUICK: dict[str, list[str]] = {
    "tiny_pair_speed": ["--prompt-len", "8", "--new-tokens", "16", "--repeats", "1"],
    "kv_cache": ["--model", "tiny", "--quick"],
    "speculative": ["--target", "tiny", "--draft", "tiny-draft", "--quick"],
    "engine": ["--models", "smollm2-135m", "tiny", "--quick", "--no-hf", "--no-progress"],
    "quant_quality": ["--models", "tiny", "--dataset", "stdlib", "--quick", "--n-samples", "4",
                      "--seq-len", "64", "--eval-tokens", "2048", "--no-progress"],
    "serve": ["--models", "smollm2-135m", "tiny", "--quick", "--no-fail"],
    "quant_kernels": ["--quick"],
    "paged_attention": ["--quick"],
}


def plan(gpu: bool, quick: bool, only: list[str] | None) -> dict[str, list[str]]:
    chosen = GPU_SET if gpu else CPU_SET
    if only:
        unknown = [n for n in only if n not in chosen]
        if unknown:
            raise SystemExit(f"--only: {', '.join(unknown)} not in the {'GPU' if gpu else 'CPU'} set "
                             f"({', '.join(chosen)})")
        chosen = {n: a for n, a in chosen.items() if n in only}
    return {name: list(QUICK[name] if quick else args) for name, args in chosen.items()}


def cuda_line() -> str | None:
    """None when torch sees a CUDA device, else the one line ``make bench-gpu`` prints."""
    import torch

    if torch.cuda.is_available():
        return None
    return f"bench-gpu: no CUDA device found (torch {torch.__version__} sees no GPU); nothing run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU set (Triton kernel benchmarks)")
    parser.add_argument("--require-cuda", action="store_true",
                        help="with --gpu: exit 1 (not 0) when there is no CUDA device")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test settings (default results folder: a new temporary one)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"folder for result files and the summary (default: {summary.RESULTS})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks of the set")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    if args.gpu:
        line = cuda_line()
        if line is not None:
            print(line, flush=True)
            return 1 if args.require_cuda else 0
    benchmarks = plan(args.gpu, args.quick, args.only)
    results = args.results
    if results is None:
        results = (Path(tempfile.mkdtemp(prefix="course-bench-quick-")) if args.quick and not args.dry_run
                   else summary.RESULTS)

    from course_lib import runtime

    slug = runtime.machine_slug()
    commands = {name: [sys.executable, str(HERE / f"{name}.py"), *extra,
                       "--out", str(summary.result_path(results, name, slug))]
                for name, extra in benchmarks.items()}
    label = "bench-gpu" if args.gpu else "bench"
    print(f"{label}: {len(commands)} benchmarks on {runtime.machine_description()}, results in {results}"
          + (" (quick smoke-test settings)" if args.quick else ""), flush=True)
    if args.dry_run:
        for cmd in commands.values():
            print(shlex.join(cmd))
        return 0

    runs, failed = {}, []
    start = time.perf_counter()
    for i, (name, cmd) in enumerate(commands.items(), 1):
        print(f"\n== [{i}/{len(commands)}] {name}: {shlex.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        seconds = time.perf_counter() - t0
        runs[name] = {"args": shlex.join(cmd[2:-2]), "seconds": round(seconds, 1), "returncode": rc,
                      "quick": args.quick}
        print(f"-- {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    total = time.perf_counter() - start

    print(f"\n== {label}: wall time " + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in runs.items())
          + f"; total {total:.0f} s ({total / 60:.1f} min)", flush=True)
    json_path, md_path = summary.write_summary(results, runs)
    print("\n" + md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if failed:
        print(f"{label}: {len(failed)} benchmark(s) failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
