"""What the trusted grader costs: grading the solutions class, today's grader vs a baseline.

    python benchmarks/grading_overhead.py [--baseline REV] [--rounds 2] [--seed 11] [--out FILE]

Grades ``solutions/`` (every chapter, ``--hidden --seed S``) with this checkout's grader and with
the grader of git revision ``REV`` (default: the last commit before the checks moved out of the
student's kernel), alternating baseline / current ``--rounds`` times, each in a fresh process
from a temporary folder; prints every wall time and the ratio of the medians, and writes
``benchmarks/results/grading_overhead-<machine>.json``. Both graders must give the solutions
full marks. Run it with nothing else on the machine (each row records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from course_lib import runtime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The last commit whose grader ran the checks inside the student's kernel.
BASELINE = "1eba26e"


def baseline_tree(rev: str, into: Path) -> Path:
    """The repository at ``rev``, unpacked into ``into``."""
    archive = into / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def grade_once(tree: Path | None, seed: int, out: Path) -> dict:
    """Grade the solutions with the grader in ``tree`` (None: this checkout's); wall time,
    points and the load average."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    solutions = (tree or ROOT) / "solutions"
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # the baseline's course_lib shadows the installed one
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "course_lib", "grade", str(solutions), "--out",
                           str(out), "--hidden", "--seed", str(seed)], env=env, cwd=out.parent,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"grading failed ({'baseline' if tree else 'current'}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    record = json.loads((out / "grades.json").read_text())
    row = next(iter(record["students"].values()))
    return {"grader": "baseline" if tree else "current", "seconds": round(wall, 1),
            "points": row["total"], "max_points": row["max_total"],
            "per_notebook_s": {c[:2]: nb["wall_s"] for c, nb in row["notebooks"].items()},
            "sandbox": record.get("sandbox", "none (baseline: checks in the kernel)"),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline grader")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="grading-overhead-") as tmp:
        tree = baseline_tree(args.baseline, Path(tmp))
        for round_ in range(args.rounds):
            for which in (tree, None):
                out = Path(tmp) / f"out-{round_}-{'baseline' if which else 'current'}"
                row = grade_once(which, args.seed, out)
                rows.append({"round": round_, **row})
                print(f"round {round_} {row['grader']:8s} {row['seconds']:7.1f} s  "
                      f"{row['points']}/{row['max_points']} points  load {row['load_before']}",
                      flush=True)
    bad = [r for r in rows if r["points"] != r["max_points"]]
    if bad:
        raise SystemExit(f"the solutions did not get full marks: {bad}")
    median = {g: statistics.median(r["seconds"] for r in rows if r["grader"] == g)
              for g in ("baseline", "current")}
    ratio = median["current"] / median["baseline"]
    print(f"median: baseline {median['baseline']:.1f} s, current {median['current']:.1f} s: "
          f"current / baseline = {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    out = args.out or RESULTS / f"grading_overhead-{runtime.machine_slug()}.json"
    out.write_text(json.dumps({
        "benchmark": "grading_overhead", "machine": runtime.machine_description(),
        "baseline": args.baseline, "seed": args.seed, "rows": rows,
        "median_s": median, "ratio": round(ratio, 3),
        "method": "course-lib grade solutions --hidden, fresh process per run, alternating "
                  "baseline/current, OMP_NUM_THREADS=1"}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
