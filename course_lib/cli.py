"""The ``course-lib`` command (also ``python -m course_lib``).

Each subcommand lives in the module that does the work; this file only wires them to argparse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _doctor(args: argparse.Namespace) -> int:
    from course_lib.doctor import run_doctor

    return run_doctor(check_network=not args.no_network)


def _build_exercises(args: argparse.Namespace) -> int:
    from course_lib.exercises import build_exercises_cli

    return build_exercises_cli(args.solutions, args.exercises, check=args.check)


def _quantize(args: argparse.Namespace) -> int:
    from course_lib.quant.command import quantize_cli

    try:
        return quantize_cli(args)
    except (ValueError, FileNotFoundError) as exc:  # bad arguments for this model: say which
        print(f"course-lib quantize: error: {exc}", file=sys.stderr)
        return 2


def _group_size(text: str) -> int | None:
    from course_lib.quant.command import parse_group_size

    try:
        return parse_group_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model's weights (RTN, GPTQ or AWQ) and save a checkpoint")
    q.add_argument("--model", default="tiny", help="tiny, smollm2-135m, gpt2, gpt2-medium, ... (default: tiny)")
    q.add_argument("--method", choices=("rtn", "gptq", "awq"), default="gptq")
    q.add_argument("--bits", type=int, choices=range(2, 9), default=4, metavar="{2..8}")
    q.add_argument("--group-size", type=_group_size, default=128,
                   help="input channels per scale, or 'none' for one scale per output channel (default: 128)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--dataset", choices=("auto", "wikitext2", "stdlib"), default="auto",
                   help="calibration and evaluation text (default: WikiText-2 when reachable, else stdlib)")
    q.add_argument("--n-samples", type=int, default=128, help="calibration windows (default: 128)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    q.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    q.add_argument("--eval-tokens", type=int, default=65536,
                   help="evaluation tokens for perplexity before/after; 0 = the whole test text (default: 65536)")
    q.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    q.add_argument("--out", required=True, help="folder to write the checkpoint and report.json to")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_quantize)


def _needs_extra(command: str, module: str, function: str, extra: str):
    """``module.function``, imported only when ``command`` runs; if a package of the optional
    ``extra`` is not installed, exit with one line that says which and how to install it."""
    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("course_lib"):
            raise
        raise SystemExit(f"course-lib {command} needs the {extra} extra ({exc.name} is missing): "
                         f"pip install 'course_lib[{extra}]'") from None


def _serve(args: argparse.Namespace) -> int:
    return _needs_extra("serve", "course_lib.serving.server", "serve_cli", "serve")(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from course_lib.serving.loadgen import bench_serve_cli

    return bench_serve_cli(args)


#: Environment variable read when ``--api-key`` is not given (e.g. from a Kubernetes Secret).
API_KEY_ENV = "COURSE_LIB_API_KEY"


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="GPT-2 family: tiny (bundled), gpt2, gpt2-medium, ...; LLaMA family: "
                   "smollm2-135m (SmolLM2-135M-Instruct, offline), smollm2-360m, qwen2.5-0.5b, "
                   "... (default: tiny)")
    p.add_argument("--quantized", metavar="DIR", help="serve this quantized checkpoint of --model "
                   "(made by `course-lib quantize --model` with the same model)")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; "
                   "0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue", type=_positive, default=256,
                   help="waiting requests before new ones get 503 + Retry-After (default: 256)")
    p.add_argument("--max-body-bytes", type=_positive, default=None,
                   help="larger request bodies get 413 before they are read (default: 4 MiB)")
    p.add_argument("--max-num-seqs", type=_positive, default=32, help="running batch size (default: 32)")
    p.add_argument("--max-num-batched-tokens", type=_positive, default=512,
                   help="tokens per engine step (default: 512)")
    p.add_argument("--block-size", type=_positive, default=16, help="KV block size (default: 16)")
    p.add_argument("--num-blocks", type=_positive, help="KV blocks (default: from the memory budget)")
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA if present)")
    p.add_argument("--compile-decode", action="store_true",
                   help="run decode steps through torch.compile (compiled before the server is "
                   "ready, which takes minutes on a CPU; off by default; on a CPU only steps of up to 16 "
                   "sequences go compiled: benchmarks/compiled_decode.py measures the gain)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads on a CPU (default: the course's rule, runtime.cpu_threads: "
                   "the usable cores minus one for the event loop, or $COURSE_THREADS)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: 30)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_serving(sub) -> None:
    from course_lib.serving.loadgen import add_bench_serve_arguments  # light: no httpx until run

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, "
                           "/metrics, /health)")
    _add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    bench = sub.add_parser("bench", help="benchmarks against a running server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    load = bench_sub.add_parser("serve", help="load a server with streaming requests: TTFT, TPOT, "
                                "ITL, E2E, throughput, goodput")
    add_bench_serve_arguments(load)
    load.set_defaults(func=_bench_serve)


def _book(args: argparse.Namespace) -> int:
    return _needs_extra("book", "course_lib.book", "book_cli", "notebooks")(args)


def _add_book(sub) -> None:
    # light: nbconvert and nbclient are imported only when the book is built
    from course_lib.book import DEFAULT_NOTEBOOKS, DEFAULT_OUT, DEFAULT_TIMEOUT

    b = sub.add_parser("book", help="execute the notebooks and render them, outputs and plots "
                       "included, to a static HTML book (index.html + one page per chapter)")
    b.add_argument("--notebooks", default=DEFAULT_NOTEBOOKS,
                   help=f"folder of notebooks (default: {DEFAULT_NOTEBOOKS})")
    b.add_argument("--out", default=DEFAULT_OUT, help=f"folder to write the HTML to (default: {DEFAULT_OUT})")
    b.add_argument("--only", nargs="+", metavar="PREFIX",
                   help="only the notebooks whose name starts with one of these, e.g. --only 00 01")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="fast", action="store_true", default=None,
                      help="COURSE_FAST=1: small shapes, tiny models (default without a CUDA GPU)")
    mode.add_argument("--full", dest="fast", action="store_false",
                      help="full size (default with a CUDA GPU)")
    b.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT,
                   help=f"seconds one cell may run (default: {DEFAULT_TIMEOUT})")
    b.add_argument("--online", action="store_true",
                   help="let the notebooks reach the model hub (default: COURSE_OFFLINE=1)")
    b.set_defaults(func=_book)


def _grade(args: argparse.Namespace) -> int:
    return _needs_extra("grade", "course_lib.grading.grader", "grade_cli", "notebooks")(args)


def _chapter(text: str) -> str:
    from course_lib.grading import TASKS

    chapters = sorted({t.notebook for t in TASKS.values()})
    found = [c for c in chapters if c == text or c.startswith(text.zfill(2) + "_")]
    if not found:
        raise argparse.ArgumentTypeError(f"unknown chapter {text!r}; graded chapters are "
                                         f"{', '.join(chapters)}")
    return found[0]


def _add_grade(sub) -> None:
    g = sub.add_parser("grade", help="run and grade submitted notebooks (CSV, JSON, JUnit XML, "
                       "feedback)", description="Run every student's notebooks (fast mode, "
                       "offline, one process each, with time and memory limits) and grade every "
                       "check. SUBMISSIONS: a folder of student folders, one student's folder, "
                       "or one notebook.")
    g.add_argument("submissions", type=Path, metavar="SUBMISSIONS")
    g.add_argument("--out", type=Path, default=Path("grades"),
                   help="folder for grades.csv, grades.json, junit.xml (default: ./grades)")
    g.add_argument("--hidden", action="store_true",
                   help="also run the instructor-only cases (new seeds and shapes)")
    g.add_argument("--seed", type=int, help="seed of the hidden cases (default: a random one, "
                   "printed and saved in grades.json)")
    g.add_argument("--feedback", action="store_true",
                   help="write feedback/<student>.md: what failed and why")
    g.add_argument("--chapters", nargs="+", type=_chapter, metavar="NN",
                   help="chapters to grade, e.g. 01 03 (default: every chapter submitted)")
    g.add_argument("--timeout", type=float, default=900,
                   help="seconds for a notebook's own cells (default: 900)")
    g.add_argument("--cell-timeout", type=float, default=120,
                   help="seconds for one cell or one check (default: 120)")
    g.add_argument("--memory-limit", type=float, default=6, metavar="GB",
                   help="memory cap per notebook (its whole process tree where the sandbox "
                   "can, else per process), 0 for none (default: 6)")
    g.add_argument("--no-sandbox", action="store_true",
                   help="run the kernels without the namespace sandbox (where it breaks "
                   "something; the checks still run outside the kernels)")
    g.add_argument("--jobs", type=_positive, default=1, help="notebooks graded at once (default: 1)")
    g.set_defaults(func=_grade)


def _sync_notebooks(args) -> int:
    from course_lib.notebook_setup import main as sync_main

    return sync_main(check=args.check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="course-lib", description="LLM inference optimization course: tools for learners, instructors and graders."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = sub.add_parser("doctor", help="report versions, device, Triton mode and which models/datasets are reachable")
    doctor.add_argument("--no-network", action="store_true", help="do not probe the model and dataset hubs")
    doctor.set_defaults(func=_doctor)

    build = sub.add_parser("build-exercises", help="make exercises/*.ipynb from solutions/*.ipynb")
    build.add_argument("--solutions", default="solutions", help="folder of solution notebooks (default: solutions)")
    build.add_argument("--exercises", default="exercises", help="folder to write exercises to (default: exercises)")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is out of date")
    build.set_defaults(func=_build_exercises)
    sync = sub.add_parser("sync-notebooks", help="regenerate every notebook's Colab setup cell and time-to-run "
                          "line (from pyproject.toml and benchmarks/results)")
    sync.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is out of date")
    sync.set_defaults(func=_sync_notebooks)
    _add_quantize(sub)
    _add_serving(sub)
    _add_grade(sub)
    _add_book(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
