"""`course-lib grade` against hostile submissions (tests/hostile_fixtures.py): every attack and
every bad input gets 0 points, and the control student ``solved`` in the same class still gets
10/10, nothing the grader writes is changed, nothing a notebook starts outlives the run.

One graded run of the whole class (--jobs 2, --feedback), then one --hidden run of the students
that could score with any seed; both happen in a module fixture, which also records what must
be observed at once (processes alive when ``cli.main`` returns, grades.csv 3 s later, planted
files, the peak memory of the grader's processes). The fixture runs twice: in the platform's
sandbox (skipped where there is none) and with ``--no-sandbox``, where the properties that need
the sandbox (a notebook cannot read other processes' environments nor write other people's
files) are skipped and everything else must still hold. About two minutes per mode.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from hostile_fixtures import (
    BAD_INPUT,
    CH01,
    HIDDEN_RUN,
    HOSTILE,
    STUDENTS,
    TASK_IDS,
    build_hostile_class,
    marker,
)

import course_lib
from course_lib import cli
from course_lib.grading import TASKS
from course_lib.grading.sandbox import choose

pytestmark = pytest.mark.timeout(600)

CELL_TIMEOUT = 20  # s, as in test_grader.py
SEED = 987654  # the hidden seed: a value that appears nowhere else
TOKEN = secrets.token_hex(6)  # marks every process and file the notebooks start or plant
SECRET = "secret-" + secrets.token_hex(12)  # COURSE_TEST_SECRET in the grader's environment
RSS_LIMIT = 1024 ** 3  # bytes: the grader must not hold a notebook's endless output
FULL = {t: TASKS[t].points for t in TASK_IDS}


# --- what the module fixture observes ----------------------------------------------------------


def _marked_processes(token: str = TOKEN) -> list[psutil.Process]:
    """Processes with this run's marker in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker(token) in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def _end_marked_processes(token: str = TOKEN) -> None:
    """Kill, by pid, every process this run's notebooks started (found by the marker)."""
    for proc in _marked_processes(token):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _tree_hash(folder: Path) -> str:
    """A digest of every file under ``folder`` but bytecode caches (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _remove_planted(*folders: Path) -> list[str]:
    """Delete files whose name holds the marker under ``folders``; the paths deleted."""
    planted = []
    for folder in folders:
        for path in folder.rglob(f"*{TOKEN}*") if folder.exists() else ():
            if path.is_file():
                path.unlink()
                planted.append(str(path))
    return planted


class _PeakRss:
    """Sample, in a thread, the largest RSS of the grader's children that are not Jupyter
    kernels nor the notebooks' own processes, and how much this process (which runs
    ``cli.main``) grew: the grader's memory. This process's own RSS is counted from where it
    stood at the start, since earlier tests in the same session may have left it large."""

    def __init__(self) -> None:
        self.peak, self.where = 0, ""
        self._base = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.1):
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    args = " ".join(proc.cmdline())
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                if proc.pid == me.pid:
                    rss -= self._base
                if "ipykernel" not in args and marker(TOKEN) not in args and rss > self.peak:
                    self.peak, self.where = rss, args[:200]

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Observed:
    mode: str  # "sandbox" or "no-sandbox"
    record: dict
    out: Path
    subs: Path
    solved_bytes: bytes
    csv_after_wait: dict[str, dict[str, str]]
    leftovers: list[str]
    planted: list[str]
    lib_before: str
    lib_after: str
    peak_rss: int
    peak_where: str
    hidden: dict = field(default_factory=dict)
    hidden_out: Path | None = None
    hidden_leftovers: list[str] = field(default_factory=list)


def _grade(submissions: Path, out: Path, mode: str, *extra: str) -> dict:
    code = cli.main(["grade", str(submissions), "--out", str(out), "--jobs", "2",
                     "--cell-timeout", str(CELL_TIMEOUT), "--feedback", *extra,
                     *(["--no-sandbox"] if mode == "no-sandbox" else [])])
    assert code == 0
    return json.loads((out / "grades.json").read_text())


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["student"]: row for row in csv.DictReader(f)}


def _leftovers() -> list[str]:
    return [" ".join(p.info["cmdline"])[:120] for p in _marked_processes()]


def needs_sandbox(observed: Observed, why: str) -> None:
    if observed.mode == "no-sandbox":
        pytest.skip(f"without a sandbox {why} (docs/instructors.md says so)")


@pytest.fixture(scope="module", params=["sandbox", "no-sandbox"])
def observed(request, tmp_path_factory):
    mode = request.param
    if mode == "sandbox" and choose().kind == "none":
        pytest.skip(choose().summary)
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    home.mkdir()
    lib = Path(course_lib.__file__).resolve().parent
    lib_before = _tree_hash(lib)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(home))  # a successful attack on ~/.ipython lands here
            mp.setenv("COURSE_TEST_SECRET", SECRET)
            subs = build_hostile_class(root / "class", TOKEN, root)
            solved_bytes = (subs / "solved" / CH01).read_bytes()
            with _PeakRss() as rss:
                record = _grade(subs, root / "out", mode)
            leftovers = _leftovers()  # at once: nothing may outlive the run
            time.sleep(3)  # a daemon that waits for the grades would have struck by now
            csv_after_wait = _csv_rows(root / "out" / "grades.csv")
            lib_after = _tree_hash(lib)
            planted = _remove_planted(lib, home)
            _end_marked_processes()
            hidden_subs = build_hostile_class(root / "hidden_class", TOKEN, root, HIDDEN_RUN)
            hidden = _grade(hidden_subs, root / "hidden_out", mode, "--hidden", "--seed",
                            str(SEED))
            hidden_leftovers = _leftovers()
        yield Observed(mode, record, root / "out", subs, solved_bytes, csv_after_wait, leftovers,
                       planted, lib_before, lib_after, rss.peak, rss.where, hidden,
                       root / "hidden_out", hidden_leftovers)
    finally:
        _end_marked_processes()
        _remove_planted(lib, home)


def _points(record: dict, student: str) -> dict[str, int]:
    return {c: r["points"] for c, r in record["students"][student]["checks"].items()}


def _notebook(record: dict, student: str) -> dict:
    return record["students"][student]["notebooks"]["01_quantization_math"]


# --- grades ------------------------------------------------------------------------------------


def test_the_control_student_gets_full_marks(observed) -> None:
    assert _points(observed.record, "solved") == FULL
    assert observed.record["students"]["solved"]["total"] == 10
    assert _points(observed.hidden, "solved") == FULL


@pytest.mark.parametrize("student", [*HOSTILE, *BAD_INPUT])
def test_every_hostile_submission_gets_zero(observed, student) -> None:
    row = observed.record["students"][student]
    assert _points(observed.record, student) == dict.fromkeys(TASK_IDS, 0), row["checks"]
    assert row["total"] == 0 and row["max_total"] == 10
    assert all(r["status"] != "pass" for r in row["checks"].values())


@pytest.mark.parametrize("student", [s for s in HIDDEN_RUN if s != "solved"])
def test_every_hostile_submission_gets_zero_with_hidden_cases(observed, student) -> None:
    assert observed.hidden["hidden_seed"] == SEED
    assert _points(observed.hidden, student) == dict.fromkeys(TASK_IDS, 0)
    assert observed.hidden["students"][student]["total"] == 0


def test_results_hold_only_known_checks_with_sane_values(observed) -> None:
    """Forged rows (1008 points, wrong types, unknown task ids) never reach the record."""
    for record in (observed.record, observed.hidden):
        assert list(record["checks"]) == list(TASK_IDS)
        for student, row in record["students"].items():
            assert list(row["checks"]) == list(TASK_IDS), student
            for task_id, result in row["checks"].items():
                assert type(result["points"]) is int and type(result["max_points"]) is int
                assert 0 <= result["points"] <= result["max_points"] == FULL[task_id], student
                assert result["status"] in ("pass", "fail", "error", "missing")
                assert isinstance(result["message"], str)
            assert row["total"] == sum(r["points"] for r in row["checks"].values())


# --- secrets -----------------------------------------------------------------------------------


def test_secrets_never_reach_the_students_report(observed) -> None:
    """The test's env var and the hidden seed stay out of proc_environ's messages and events
    (grades.json's own "hidden_seed" field is the instructor's and may hold the seed)."""
    needs_sandbox(observed, "a notebook can read the environment of the grader's processes")
    leaks = []
    for run, record, out in (("visible", observed.record, observed.out),
                             ("hidden", observed.hidden, observed.hidden_out)):
        row = record["students"]["proc_environ"]
        shown = json.dumps(row["checks"]) + json.dumps(row["notebooks"])
        shown += (out / "feedback" / "proc_environ.md").read_text()
        leaks += [f"{run} run: {name}" for name, value in (("COURSE_TEST_SECRET", SECRET),
                                                           ("the hidden seed", str(SEED)))
                  if value in shown]
    assert leaks == [], leaks


# --- damage to others --------------------------------------------------------------------------


def test_a_classmates_notebook_is_unchanged(observed) -> None:
    needs_sandbox(observed, "a notebook can write wherever the instructor can")
    assert (observed.subs / "solved" / CH01).read_bytes() == observed.solved_bytes


def test_the_grades_files_hold_the_right_rows_after_a_wait(observed) -> None:
    rows = observed.csv_after_wait
    assert set(rows) == set(STUDENTS)
    for student in STUDENTS:
        want = FULL if student == "solved" else dict.fromkeys(TASK_IDS, 0)
        assert {t: int(rows[student][t]) for t in TASK_IDS} == want, student
        assert int(rows[student]["total"]) == sum(want.values())
    if observed.mode == "sandbox":  # without one, a notebook can write into --out
        assert not list(observed.out.rglob(f"*{TOKEN}*"))
    assert json.loads((observed.out / "grades.json").read_text()) == observed.record


def test_no_process_a_notebook_started_outlives_the_run(observed) -> None:
    """Neither the damage daemon (double fork, setsid), the forge daemons, nor 200 children."""
    assert observed.leftovers == [], f"{len(observed.leftovers)} left, e.g. {observed.leftovers[:3]}"
    assert observed.hidden_leftovers == []


def test_nothing_planted_in_the_library_or_the_ipython_profile(observed) -> None:
    lib = str(Path(course_lib.__file__).resolve().parent)
    assert [p for p in observed.planted if p.startswith(lib)] == []  # the fixture deleted them
    assert observed.lib_after == observed.lib_before  # without a sandbox: the grader's guard
    if observed.mode == "sandbox":  # without one, the instructor's HOME is writable
        assert observed.planted == []


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("student", BAD_INPUT)
def test_bad_input_is_recorded_and_says_what_happened(observed, student) -> None:
    row = observed.record["students"][student]
    said = [e["message"] for e in _notebook(observed.record, student)["events"]]
    said += [r["message"] for r in row["checks"].values()]
    assert any(text.strip() for text in said), row
    if student == "not_json":
        assert all(r["status"] == "error" for r in row["checks"].values())
    if student in ("endless_print", "never_returns"):
        assert _notebook(observed.record, student)["events"], row


def test_endless_output_is_not_held_in_memory(observed) -> None:
    assert observed.peak_rss < RSS_LIMIT, (observed.peak_rss >> 20, observed.peak_where)


def test_a_cell_ignoring_interrupts_is_graded_as_far_as_it_got(observed) -> None:
    notebook = _notebook(observed.record, "never_returns")
    assert any(e["kind"] == "timeout" for e in notebook["events"]), notebook["events"]
    assert notebook["wall_s"] is not None and notebook["wall_s"] < 3 * CELL_TIMEOUT + 30
    # defined before the endless cell, so graded (a wrong answer), not "not defined"
    assert observed.record["students"]["never_returns"]["checks"]["01.dequantize"]["status"] == \
        "fail"


def test_the_class_run_took_reasonable_time(observed) -> None:
    """Nothing waits for a notebook's whole budget (900 s) or the runner's wall limit."""
    assert observed.record["wall_s"] < 360


def test_marker_helpers_find_and_end_a_marked_process() -> None:
    """The cleanup the fixture relies on: a process with the marker is found, then ended."""
    import subprocess

    token = secrets.token_hex(6)
    proc = subprocess.Popen([f"{marker(token)}-probe", "60"], executable="/bin/sleep")
    try:
        assert [p.pid for p in _marked_processes(token)] == [proc.pid]
        _end_marked_processes(token)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
