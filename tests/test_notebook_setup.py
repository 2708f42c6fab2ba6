"""Every notebook's generated parts (Colab cell, time line) are current, and every lesson ends with
questions whose answers are in its solution notebook, and a further-reading list."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import nbformat
import pytest

from course_lib import notebook_setup
from course_lib.exercises import BEGIN_MARKER, END_MARKER

ROOT = notebook_setup.REPO_ROOT
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def solution_for(lesson: Path) -> Path:
    """The solution notebook with the lesson's number (lesson 00's is 00_perplexity)."""
    matches = sorted((ROOT / "solutions").glob(lesson.name[:3] + "*.ipynb"))
    assert len(matches) == 1, f"{lesson.name}: expected one solutions/{lesson.name[:3]}*.ipynb, found {matches}"
    return matches[0]


def _cells(path: Path) -> list:
    return nbformat.read(path, as_version=4).cells


def test_every_notebook_is_in_sync_with_pyproject_and_the_measured_times():
    stale = notebook_setup.sync_notebooks(ROOT, check=True)
    assert not stale, f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}; run: {notebook_setup.FIX_COMMAND}"


def test_the_setup_cell_uses_the_url_from_pyproject_and_no_placeholder():
    url = notebook_setup.repository_url()
    assert "<" not in url and url.startswith("https://")
    for path in LESSONS + sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "exercises").glob("*.ipynb")):
        setup = [c for c in _cells(path) if c.cell_type == "code" and c.source.startswith(notebook_setup.SETUP_MARKER)]
        assert len(setup) == 1, f"{path.name}: {len(setup)} setup cells"
        assert f'"{url}"' in setup[0].source


def _run_setup_cell(monkeypatch, colab: bool, env_url: str | None = None, installed: bool = False) -> list[list[str]]:
    calls: list[list[str]] = []
    monkeypatch.setattr("subprocess.run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if installed else None)
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    if env_url:
        monkeypatch.setenv("COURSE_REPO_URL", env_url)
    else:
        monkeypatch.delenv("COURSE_REPO_URL", raising=False)
    exec(notebook_setup.setup_cell_source("https://example.org/course"), {})
    return calls


def test_the_setup_cell_installs_only_in_colab_and_only_what_is_missing(monkeypatch):
    assert _run_setup_cell(monkeypatch, colab=False) == []
    assert _run_setup_cell(monkeypatch, colab=True, installed=True) == []
    calls = _run_setup_cell(monkeypatch, colab=True)
    assert calls[0][-1] == "course_lib[notebooks] @ git+https://example.org/course"
    assert calls[1][-2:] == ["--no-deps", notebook_setup.smollm2_requirement()]
    fork = _run_setup_cell(monkeypatch, colab=True, env_url="https://example.org/fork")
    assert fork[0][-1].endswith("git+https://example.org/fork")


def test_repository_url_must_be_https(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[project.urls]\nRepository = "<your-org>"\n')
    with pytest.raises(ValueError, match=r"\[project.urls\] Repository must be an https:// URL"):
        notebook_setup.repository_url(tmp_path)


def test_time_line_states_only_measured_modes():
    times = {("notebooks/x.ipynb", "fast"): 42.0, ("notebooks/x.ipynb", "cpu"): 600.0}
    line = notebook_setup.time_line("notebooks/x.ipynb", times, "a 2-core CPU", "notebook_times-m.json")
    assert "fast mode about 40 s" in line and "cpu mode about 10 min" in line
    assert line.count("not measured") == 1 and "full mode not measured yet" in line
    assert "not measured" in notebook_setup.time_line("notebooks/y.ipynb", times, "m", "f")
    assert "about" not in notebook_setup.time_line("notebooks/y.ipynb", times, "m", "f")


def test_sync_inserts_one_setup_cell_after_the_goals_and_is_idempotent(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T\n\n**Learning goals.**\n\n1. a\n2. b\n\nmore"),
                                         nbformat.v4.new_code_cell("x = 1")])
    once = notebook_setup.synced(nb, "notebooks/t.ipynb", "https://e.org/r", {}, "m", "f")
    twice = notebook_setup.synced(once, "notebooks/t.ipynb", "https://e.org/r", {}, "m", "f")
    assert [c.cell_type for c in once.cells] == ["markdown", "code", "code"]
    assert once.cells[1].source.startswith(notebook_setup.SETUP_MARKER)
    assert json.dumps(once.cells[0].source) == json.dumps(twice.cells[0].source)
    assert len(twice.cells) == 3
    paragraphs = once.cells[0].source.split("\n\n")
    assert paragraphs[3].startswith(notebook_setup.TIME_MARKER) and paragraphs[-1] == "more"


def _questions(markdown: str) -> list[str]:
    return re.findall(r"^\d+\.\s+(.+)$", markdown, flags=re.M)


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_lesson_ends_with_questions_answered_in_its_solution_and_further_reading(lesson):
    cells = _cells(lesson)
    heads = {c.source.split("\n")[0].strip(): c.source for c in cells if c.cell_type == "markdown"}
    questions = _questions(heads.get("## Check your understanding", ""))
    assert 3 <= len(questions) <= 5, f"{lesson.name}: {len(questions)} questions under '## Check your understanding'"
    reading = heads.get("## Further reading", "")
    assert len(re.findall(r"^[-*] ", reading, flags=re.M)) >= 3, f"{lesson.name}: 'Further reading' needs a list"
    answers = [c.source for c in _cells(solution_for(lesson))
               if c.cell_type == "markdown" and c.source.startswith("## Check your understanding")]
    assert answers, f"{solution_for(lesson).name}: no '## Check your understanding' cell"
    regions = re.findall(rf"{re.escape(BEGIN_MARKER)}\n(.+?)\n{re.escape(END_MARKER)}", answers[0], flags=re.S)
    assert len(regions) == len(questions), (f"{solution_for(lesson).name}: {len(regions)} answers for "
                                            f"{len(questions)} questions in {lesson.name}")
    assert all(len(r.split()) >= 15 for r in regions), f"{solution_for(lesson).name}: an answer under 15 words"
