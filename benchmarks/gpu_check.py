"""The one command for the day a GPU is lent: ``make gpu-check`` (under 10 minutes on one GPU).

Everything this project can only prove on CUDA, in one run, each step with its own time limit:

1. the gpu-marked tests (``pytest -m gpu tests``): every kernel against its torch twin on the
   GPU, the engine's Triton paths;
2. ``make bench-gpu`` (``benchmarks/run_all.py --gpu``): the W4A16/W8A16 matmuls against fp16
   cuBLAS and the paged-attention decode, ratios measured in the same run;
3. the two kernel lessons at full size, notebooks 02 and 06 (``COURSE_MODE=full``): their
   measured-vs-predicted roofline cells only run on a GPU. The executed copies, figures included,
   go to ``benchmarks/results/gpu-check-<machine>/``.

Then ``benchmarks/results/gpu_check-<machine>.json`` records each step's exit status, time and
last lines of output, and the device. It fails at once, with one line and exit status 2, on a
machine where torch sees no CUDA device; it exits 1 when any step failed.

    python benchmarks/gpu_check.py [--dry-run] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LESSONS = ("notebooks/02_post_training_quantization.ipynb", "notebooks/06_paged_attention.ipynb")
BUDGET_S = 600


def steps(results: Path, slug: str) -> list[tuple[str, list[str], dict, int]]:
    """(name, command, extra environment, time limit in s) of each step; limits sum to the budget."""
    py = sys.executable
    executed = results / f"gpu-check-{slug}"
    plan = [("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests"], {}, 180),
            ("bench-gpu", [py, str(HERE / "run_all.py"), "--gpu", "--require-cuda",
                           "--results", str(results)], {}, 240)]
    for notebook in LESSONS:
        plan.append((f"notebook {Path(notebook).stem}",
                     [py, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                      "--ExecutePreprocessor.timeout=85", "--ExecutePreprocessor.kernel_name=python3",
                      "--output-dir", str(executed), str(ROOT / notebook)],
                     {"COURSE_MODE": "full", "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
                     90))
    assert sum(limit for *_, limit in plan) <= BUDGET_S
    return plan


def cuda_device() -> str | None:
    """The GPU's name, or None when torch sees no CUDA device."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_step(cmd: list[str], env: dict, limit: int) -> tuple[int, float, str]:
    """(exit status, seconds, last lines of output); 124 when the step ran past its limit."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=limit)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        rc, output = 124, (out.decode(errors="replace") if isinstance(out, bytes) else out)
        output += f"\n(stopped after its {limit} s limit)"
    return rc, time.perf_counter() - start, "\n".join(output.strip().splitlines()[-15:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)

    from course_lib import runtime

    slug = runtime.machine_slug()
    plan = steps(args.results, slug)
    if args.dry_run:
        for name, cmd, env, limit in plan:
            prefix = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"{name} (limit {limit} s): {prefix + ' ' if prefix else ''}{shlex.join(cmd)}")
        return 0
    device = cuda_device()
    if device is None:
        import torch

        print(f"gpu-check: no CUDA device (torch {torch.__version__} sees no GPU); this check "
              "needs one. Nothing was run.", file=sys.stderr, flush=True)
        return 2

    print(f"gpu-check on {device} ({runtime.machine_description()}), {len(plan)} steps, "
          f"budget {BUDGET_S} s", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cmd, env, limit in plan:
        rc, seconds, tail = run_step(cmd, env, limit)
        rows.append({"step": name, "command": shlex.join(cmd), "returncode": rc,
                     "seconds": round(seconds, 1), "limit_s": limit, "output_tail": tail})
        print(f"-- {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)
        if rc != 0:
            print(tail, flush=True)
    out = args.results / f"gpu_check-{slug}.json"
    out.write_text(json.dumps({"device": device, "machine": runtime.machine_description(),
                               "steps": rows}, indent=1))
    failed = [r["step"] for r in rows if r["returncode"] != 0]
    total = sum(r["seconds"] for r in rows)
    print(f"gpu-check: {len(rows) - len(failed)}/{len(rows)} steps passed in {total:.0f} s; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
