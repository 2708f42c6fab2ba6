"""`course-lib grade`: a class of fixture submissions graded to exact points, the outputs, and
how submissions are found. The fixture runs start real kernels (about two minutes in all)."""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from grading_fixtures import CH01, EXPECTED, build_fixture_submissions

import course_lib
from course_lib import cli
from course_lib.grading import TASKS
from course_lib.grading.grader import (
    LibraryGuard,
    _parse_stream,
    _read_capped,
    chapter_of,
    find_submissions,
    hidden_folders,
    validate_results,
)
from course_lib.grading.notebook_runner import run_notebook

CELL_TIMEOUT = 20  # s; the slowest cell of solutions/01 in fast mode takes a few seconds


def _grade(submissions: Path, out: Path, *extra: str) -> dict:
    code = cli.main(["grade", str(submissions), "--out", str(out), "--jobs", "2",
                     "--cell-timeout", str(CELL_TIMEOUT), *extra])
    assert code == 0
    return json.loads((out / "grades.json").read_text())


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("grading")
    subs = build_fixture_submissions(root / "class")
    out = root / "out"
    return _grade(subs, out, "--feedback"), out


def test_every_fixture_gets_its_exact_points(graded) -> None:
    record, out = graded
    assert set(record["students"]) == set(EXPECTED)
    assert list(record["checks"]) == [t for t in TASKS if t[:2] in ("01", "08")]
    for student, expected in EXPECTED.items():
        got = {c: r["points"] for c, r in record["students"][student]["checks"].items()}
        assert got == expected, student
        assert record["students"][student]["total"] == sum(expected.values())
        assert record["students"][student]["max_total"] == 15
    with open(out / "grades.csv", newline="") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    for student, expected in EXPECTED.items():
        assert {c: int(rows[student][c]) for c in expected} == expected
        assert int(rows[student]["total"]) == sum(expected.values())


def _status(record, student, check) -> tuple[str, str]:
    result = record["students"][student]["checks"][check]
    return result["status"], result["message"]


def _events(record, student) -> list[dict]:
    return record["students"][student]["notebooks"]["01_quantization_math"]["events"]


def test_statuses_and_messages_say_what_happened(graded) -> None:
    record, _ = graded
    assert _status(record, "unsolved", "01.pack_int4")[0] == "missing"
    assert "not implemented yet" in _status(record, "unsolved", "01.pack_int4")[1]
    assert _status(record, "solved", "08.cost") == (
        "missing", "no notebook for chapter 08_deployment_and_cost in the submission")
    status, message = _status(record, "infinite_loop", "01.pack_int4")
    assert status == "error" and f"still running after {CELL_TIMEOUT} s" in message
    assert [e["kind"] for e in _events(record, "infinite_loop")] == ["timeout"]
    status, message = _status(record, "syntax_error", "01.asymmetric_quantize")
    assert (status, message) == ("missing", "asymmetric_quantize is not defined")
    assert "SyntaxError" in _events(record, "syntax_error")[0]["message"]
    assert [e["kind"] for e in _events(record, "kernel_crash")] == ["kernel died", "restart"]
    # a learner's own self-check cell that fails before the definition is only an event
    assert all(e["kind"] == "error" and "NameError" in e["message"]
               for e in _events(record, "reordered"))
    assert _events(record, "solved") == [] and _events(record, "deleted_check") == []


def test_junit_and_feedback(graded) -> None:
    record, out = graded
    suites = {s.get("name"): s for s in ET.parse(out / "junit.xml").getroot()}
    loop = suites["infinite_loop"]
    assert (loop.get("tests"), loop.get("errors"), loop.get("failures")) == ("8", "1", "3")
    case = loop.find("testcase[@name='01.pack_int4']")
    assert "still running" in case.find("error").get("message")
    assert suites["solved"].find("testcase[@name='01.pack_int4']").find("failure") is None
    report = (out / "feedback" / "syntax_error.md").read_text()
    assert "**Total: 8 / 15 points**" in report
    assert "asymmetric_quantize is not defined" in report and "SyntaxError" in report
    assert len(list((out / "feedback").glob("*.md"))) == len(EXPECTED)


def test_hidden_cases_fail_the_hardcoded_answers(graded, tmp_path) -> None:
    visible, _ = graded
    assert visible["students"]["hardcoded"]["checks"]["08.cost"]["points"] == 1
    build_fixture_submissions(tmp_path / "all")
    subs = tmp_path / "class"
    subs.mkdir()
    for student in ("solved", "hardcoded"):
        (tmp_path / "all" / student).rename(subs / student)
    record = _grade(subs, tmp_path / "out", "--hidden", "--seed", "7")
    assert record["hidden"] and record["hidden_seed"] == 7
    status, message = _status(record, "hardcoded", "08.cost")
    assert status == "fail" and message.startswith("hidden case")
    assert record["students"]["solved"]["total"] == 10  # a right answer passes hidden cases


# --- without kernels ---------------------------------------------------------------------------


def test_chapter_of_a_notebook_name() -> None:
    assert chapter_of(Path("01_quantization_math.ipynb")) == "01_quantization_math"
    assert chapter_of(Path("03-my copy.ipynb")) == "03_gptq_awq"
    assert chapter_of(Path("00_start_here.ipynb")) is None  # no graded tasks
    assert chapter_of(Path("notes.ipynb")) is None and chapter_of(Path("012.ipynb")) is None


def test_find_submissions(tmp_path, monkeypatch) -> None:
    nb = nbformat.v4.new_notebook()
    for path in ("ann/week1/01_quantization_math.ipynb", "ann/01-copy.ipynb", "ann/x.ipynb",
                 "ben/06_paged_attention.ipynb", "ben/.ipynb_checkpoints/06_paged_attention.ipynb"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(tmp_path / path))
    subs = {s.student: s for s in find_submissions(tmp_path)}
    assert set(subs) == {"ann", "ben"}
    assert subs["ann"].notebooks == {"01_quantization_math":
                                     tmp_path / "ann/week1/01_quantization_math.ipynb"}
    assert len(subs["ann"].ignored) == 2  # the second chapter-1 notebook, and x.ipynb
    assert list(subs["ben"].notebooks) == ["06_paged_attention"]  # checkpoints are skipped
    monkeypatch.chdir(tmp_path)  # a relative path is resolved (each notebook runs elsewhere)
    single = find_submissions(Path("ben") / "06_paged_attention.ipynb")
    assert single[0].notebooks["06_paged_attention"] == tmp_path / "ben/06_paged_attention.ipynb"
    assert [(s.student, list(s.notebooks)) for s in single] == [("ben", ["06_paged_attention"])]
    with pytest.raises(ValueError, match="does not exist"):
        find_submissions(tmp_path / "nobody")


def test_bad_arguments_get_clear_errors(tmp_path, capsys) -> None:
    assert cli.main(["grade", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.ipynb").write_text("{}")
    assert cli.main(["grade", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "belongs to a graded chapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["grade", str(tmp_path), "--chapters", "42"])
    assert "unknown chapter '42'" in capsys.readouterr().err


def test_an_unreadable_notebook_is_an_error_for_each_check(tmp_path) -> None:
    path = tmp_path / CH01
    path.write_text('{"cells": [')
    report = run_notebook(path, ["01.dequantize", "01.pack_int4"])
    assert [r["status"] for r in report.results] == ["error", "error"]
    assert report.results[0]["message"].startswith("the notebook could not be read")


def test_grade_without_the_notebook_packages_says_which_extra(monkeypatch, tmp_path) -> None:
    for name in ("course_lib.grading.grader", "course_lib.grading.notebook_runner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "nbclient", None)  # as if nbclient were not installed
    with pytest.raises(SystemExit) as info:
        cli.main(["grade", str(tmp_path)])
    assert str(info.value) == ("course-lib grade needs the notebooks extra (nbclient is missing): "
                               "pip install 'course_lib[notebooks]'")


# --- what a runner reports is checked before it counts --------------------------------------

CH01_TASKS = [t for t in TASKS if t.startswith("01.")]


def _row(task: str, status: str = "pass", points=None, message="") -> dict:
    points = TASKS[task].points if points is None else points
    return {"task": task, "status": status, "points": points, "message": message}


def test_forged_results_are_replaced_by_errors() -> None:
    good = _row("01.dequantize")
    rows = [good, _row("01.pack_int4", points=1008), _row("01.symmetric_quantize", points="2"),
            _row("01.asymmetric_quantize", status="great"),
            _row("01.per_group_quantize", status="fail", points=3),
            _row("08.cost"), _row("01.dequantize", status="fail", points=0), "not a row", None]
    results, problems = validate_results(rows, CH01_TASKS)
    by_task = {r["task"]: r for r in results}
    assert [r["task"] for r in results] == CH01_TASKS  # one result per task, in order
    assert by_task["01.dequantize"]["points"] == 1 and by_task["01.dequantize"]["passed"]
    for task in ("01.pack_int4", "01.symmetric_quantize", "01.asymmetric_quantize",
                 "01.per_group_quantize"):
        assert (by_task[task]["status"], by_task[task]["points"]) == ("error", 0), task
        assert by_task[task]["max_points"] == TASKS[task].points
    assert len(problems) == 8  # four invalid, 08.cost, the duplicate, two non-rows
    assert sum(r["points"] for r in results) == 1


def test_a_pass_must_carry_exactly_the_tasks_points() -> None:
    results, problems = validate_results([_row("01.per_group_quantize", points=2)],
                                         ["01.per_group_quantize"])
    assert results[0]["status"] == "error" and problems


def test_only_lines_with_the_runners_token_count() -> None:
    real = {"results": [_row("01.dequantize")], "events": []}
    forged = {"results": [_row("01.dequantize", points=1008)], "events": []}
    lines = [json.dumps({"token": "secret", "event": {"cell": 3, "kind": "error",
                                                      "message": "x"}}),
             json.dumps({"token": "guess", "report": forged}), "garbage {",
             json.dumps({"token": "secret", "report": real}),
             json.dumps({"token": "guess", "report": forged})]
    report, events = _parse_stream("\n".join(lines).encode(), "secret")
    assert report == real and events == [{"cell": 3, "kind": "error", "message": "x"}]
    assert _parse_stream(b"\n".join(line.encode() for line in lines[:3]), "secret")[0] is None


def test_a_runner_that_prints_without_end_is_read_within_the_cap() -> None:
    import io

    class Endless(io.RawIOBase):
        def __init__(self, total: int) -> None:
            self.left = total

        def readable(self) -> bool:
            return True

        def readinto(self, buf) -> int:
            n = min(len(buf), self.left)
            buf[:n] = b"x" * n
            self.left -= n
            return n

    stream = io.BufferedReader(Endless(64 * 1024 ** 2))
    assert len(_read_capped(stream, 1024 ** 2, keep_tail=False)) == 1024 ** 2
    stream = io.BufferedReader(Endless(8 * 1024 ** 2))
    assert len(_read_capped(stream, 1000, keep_tail=True)) == 1000


def test_the_library_guard_undoes_a_submissions_changes(tmp_path) -> None:
    lib = tmp_path / "lib"
    (lib / "grading").mkdir(parents=True)
    (lib / "grading" / "checks.py").write_text("ORIGINAL = True\n")
    guard = LibraryGuard(lib)
    (lib / "grading" / "checks.py").write_text("ORIGINAL = False\n")
    (lib / "grading" / "_pwned.py").write_text("x = 1\n")
    assert guard.restore() == ["added grading/_pwned.py", "changed grading/checks.py"]
    assert (lib / "grading" / "checks.py").read_text() == "ORIGINAL = True\n"
    assert not (lib / "grading" / "_pwned.py").exists()
    assert guard.restore() == []


def test_hidden_folders_never_hide_what_the_kernel_needs(tmp_path) -> None:
    subs, out = tmp_path / "class", tmp_path / "out"
    subs.mkdir()
    assert hidden_folders(subs, out)[:2] == [subs.resolve(), out.resolve()]
    repo = Path(course_lib.__file__).resolve().parents[1]
    assert repo not in hidden_folders(subs, repo)  # --out . in the repository
    assert Path(sys.prefix).resolve() not in hidden_folders(Path(sys.prefix), out)
