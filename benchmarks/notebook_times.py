"""How long each notebook takes top to bottom, per run mode: the "time to run" line of every notebook.

    python benchmarks/notebook_times.py [--modes fast cpu] [--folders notebooks solutions]
                                        [--only 03 09] [--timeout 1800] [--out FILE]

Each notebook runs in a fresh ``python3`` kernel through nbclient (what nbval and ``course-lib
book`` use), from its own folder, offline (``COURSE_OFFLINE=1``), with ``COURSE_MODE`` set to the
mode; the wall time includes the kernel's start. Results are merged into
``benchmarks/results/notebook_times-<machine>.json`` (a row per notebook and mode; a rerun
replaces its rows), which ``python -m course_lib sync-notebooks`` turns into each notebook's
"Time to run" line. Run it with nothing else on the machine: the figures are what a learner
waits on this machine, and a shared CPU inflates them: each row records the 1-minute load
average before and after, and the time line calls a figure an upper bound when the machine was
busy (load above its core count).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

from course_lib import runtime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_notebook(path: Path, mode: str, timeout: int, keep: Path | None = None) -> dict:
    """Execute ``path`` in ``mode``; its wall time, whether it finished, and the first error line.
    With ``keep``, the executed notebook (outputs included) is written there."""
    nb = nbformat.read(path, as_version=4)
    os.environ.update(COURSE_MODE=mode, COURSE_OFFLINE="1", MPLBACKEND="Agg")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except Exception as exc:  # a failing cell: recorded, and the next notebook still runs
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, keep / f"{path.stem}-{mode}.ipynb")
    return {"notebook": f"{path.parent.name}/{path.name}", "mode": mode,
            "seconds": round(time.perf_counter() - start, 1), "ok": error is None, "error": error,
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["fast", "cpu"], choices=runtime.COURSE_MODES)
    parser.add_argument("--folders", nargs="+", default=["notebooks", "solutions"])
    parser.add_argument("--only", nargs="*", default=[], help="notebook number prefixes, e.g. 03 09")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the executed notebooks to this folder")
    args = parser.parse_args()
    out = args.out or RESULTS / f"notebook_times-{runtime.machine_slug()}.json"
    data = json.loads(out.read_text()) if out.exists() else {"benchmark": "notebook_times", "rows": []}
    data.update(machine=runtime.machine_description(), torch=torch.__version__,
                method="nbclient, fresh python3 kernel per notebook, offline, from the notebook's folder")
    paths = [p for folder in args.folders for p in sorted((ROOT / folder).glob("*.ipynb"))
             if not args.only or p.name[:2] in args.only]
    for mode in args.modes:
        for path in paths:
            row = run_notebook(path, mode, args.timeout, args.keep)
            print(f"{mode:5s} {row['notebook']:48s} {row['seconds']:7.1f} s  {'ok' if row['ok'] else row['error']}",
                  flush=True)
            data["rows"] = [r for r in data["rows"] if (r["notebook"], r["mode"]) != (row["notebook"], mode)]
            data["rows"].append(row)
            out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
