"""The ``course-lib`` command (also ``python -m course_lib``).

Each subcommand lives in the module that does the work; this file only wires them to argparse.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _doctor(args: argparse.Namespace) -> int:
    from course_lib.doctor import run_doctor

    return run_doctor(check_network=not args.no_network)


def _build_exercises(args: argparse.Namespace) -> int:
    from course_lib.exercises import build_exercises_cli

    return build_exercises_cli(args.solutions, args.exercises, check=args.check)


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
