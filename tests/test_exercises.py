"""Tests for course_lib.exercises: solutions/*.ipynb -> exercises/*.ipynb."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from course_lib.cli import main
from course_lib.exercises import (
    ExerciseMarkerError,
    build_exercises,
    build_exercises_cli,
    make_exercise,
    strip_solutions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WHERE = "sol.ipynb, cell 0 (0-based)"


# --- strip_solutions -------------------------------------------------------------------------


def test_code_region_replaced_and_indentation_kept() -> None:
    source = "\n".join(
        [
            "import math",
            "",
            "def f(x):",
            '    """Doc."""',
            "    ### BEGIN SOLUTION",
            "    y = x * 2",
            "    return y",
            "    ### END SOLUTION",
            "",
            "class A:",
            "    def g(self):",
            "        ### BEGIN SOLUTION",
            "        return 1",
            "        ### END SOLUTION",
            "",
            "print(f(2))  # kept",
        ]
    )
    expected = "\n".join(
        [
            "import math",
            "",
            "def f(x):",
            '    """Doc."""',
            "    raise NotImplementedError()",
            "",
            "class A:",
            "    def g(self):",
            "        raise NotImplementedError()",
            "",
            "print(f(2))  # kept",
        ]
    )
    assert strip_solutions(source, "code", WHERE) == expected


def test_code_outside_markers_kept_verbatim() -> None:
    # trailing spaces, tabs, a trailing newline and a comment that merely mentions the markers
    source = "x = 1   \n\ty = 2\n# see ### BEGIN SOLUTION below\n### BEGIN SOLUTION\nz = 3\n### END SOLUTION\nw = 4\n"
    assert strip_solutions(source, "code", WHERE) == (
        "x = 1   \n\ty = 2\n# see ### BEGIN SOLUTION below\nraise NotImplementedError()\nw = 4\n"
    )


def test_source_without_markers_unchanged() -> None:
    source = "a = 1\nb = 2"
    assert strip_solutions(source, "code", WHERE) == source
    assert strip_solutions("", "code", WHERE) == ""


def test_several_regions_in_one_cell() -> None:
    source = "### BEGIN SOLUTION\na = 1\n### END SOLUTION\nmiddle()\n  ### BEGIN SOLUTION\n  b = 2\n  c = 3\n  ### END SOLUTION\nend()"
    assert strip_solutions(source, "code", WHERE) == (
        "raise NotImplementedError()\nmiddle()\n  raise NotImplementedError()\nend()"
    )


def test_markdown_region() -> None:
    source = "**Question:** why?\n\n### BEGIN SOLUTION\nBecause memory bandwidth.\n### END SOLUTION\n\nNext."
    assert (
        strip_solutions(source, "markdown", WHERE)
        == "**Question:** why?\n\nYOUR ANSWER HERE\n\nNext."
    )


def test_nested_begin_names_cell_and_line() -> None:
    source = "a = 1\n### BEGIN SOLUTION\nb = 2\n    ### BEGIN SOLUTION\nc = 3\n### END SOLUTION\n"
    with pytest.raises(ExerciseMarkerError) as info:
        strip_solutions(source, "code", "sol.ipynb, cell 4 (0-based)")
    message = str(info.value)
    assert "sol.ipynb" in message and "cell 4" in message and "0-based" in message
    assert "line 4" in message
    assert "nested" in message


def test_begin_without_end() -> None:
    with pytest.raises(ExerciseMarkerError, match=r"line 2.*never closed"):
        strip_solutions("a = 1\n### BEGIN SOLUTION\nb = 2", "code", WHERE)


def test_end_without_begin() -> None:
    with pytest.raises(ExerciseMarkerError, match=r"line 3.*without a matching"):
        strip_solutions("a = 1\nb = 2\n### END SOLUTION\n", "code", WHERE)


def test_end_then_begin_is_still_unbalanced() -> None:
    with pytest.raises(ExerciseMarkerError):
        strip_solutions("### END SOLUTION\n### BEGIN SOLUTION", "markdown", WHERE)


def test_marker_error_is_a_value_error() -> None:
    assert issubclass(ExerciseMarkerError, ValueError)


# --- make_exercise ---------------------------------------------------------------------------


def _solution_notebook() -> nbformat.NotebookNode:
    nb = new_notebook(
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        }
    )
    nb.cells = [
        new_markdown_cell("# Lesson\n\nGoals first."),
        new_code_cell(
            "def f():\n    ### BEGIN SOLUTION\n    return 42\n    ### END SOLUTION",
            execution_count=3,
            outputs=[new_output("stream", name="stdout", text="42\n")],
        ),
        new_markdown_cell("Explain:\n### BEGIN SOLUTION\nsecret\n### END SOLUTION"),
        new_code_cell(
            "print('no markers')",
            execution_count=4,
            outputs=[new_output("stream", name="stdout", text="no markers\n")],
        ),
    ]
    return nb


def test_make_exercise_strips_and_clears() -> None:
    nb = _solution_notebook()
    ids = [cell.id for cell in nb.cells]
    exercise = make_exercise(nb, name="lesson.ipynb")

    assert [cell.id for cell in exercise.cells] == ids
    assert exercise.metadata == nb.metadata
    assert exercise.cells[0].source == "# Lesson\n\nGoals first."
    assert exercise.cells[1].source == "def f():\n    raise NotImplementedError()"
    assert exercise.cells[2].source == "Explain:\nYOUR ANSWER HERE"
    assert exercise.cells[3].source == "print('no markers')"
    for cell in exercise.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None
    # the input notebook is untouched
    assert nb.cells[1].execution_count == 3 and nb.cells[1].outputs
    assert "return 42" in nb.cells[1].source


def test_make_exercise_error_names_notebook_cell_and_line() -> None:
    nb = _solution_notebook()
    nb.cells[3].source = "x = 1\n### END SOLUTION"
    with pytest.raises(ExerciseMarkerError) as info:
        make_exercise(nb, name="lesson.ipynb")
    message = str(info.value)
    assert "lesson.ipynb" in message and "cell 3 (0-based)" in message and "line 2" in message


# --- build_exercises and the CLI -------------------------------------------------------------


def _write(nb: nbformat.NotebookNode, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    _write(_solution_notebook(), solutions / "01_lesson.ipynb")
    second = _solution_notebook()
    second.cells.pop(2)
    _write(second, solutions / "02_lesson.ipynb")
    return solutions, exercises


def test_build_writes_exercises_then_check_is_clean(dirs: tuple[Path, Path]) -> None:
    solutions, exercises = dirs
    written = build_exercises(solutions, exercises)
    assert sorted(Path(p).name for p in written) == ["01_lesson.ipynb", "02_lesson.ipynb"]

    exercise = nbformat.read(exercises / "01_lesson.ipynb", as_version=4)
    assert exercise.cells[1].source == "def f():\n    raise NotImplementedError()"
    assert all(
        c.outputs == [] and c.execution_count is None
        for c in exercise.cells
        if c.cell_type == "code"
    )

    assert build_exercises(solutions, exercises, check=True) == []
    assert build_exercises(solutions, exercises) == []  # nothing to rewrite
    assert (
        main(
            [
                "build-exercises",
                "--solutions",
                str(solutions),
                "--exercises",
                str(exercises),
                "--check",
            ]
        )
        == 0
    )


def test_build_is_deterministic(dirs: tuple[Path, Path]) -> None:
    solutions, exercises = dirs
    build_exercises(solutions, exercises)
    first = (exercises / "01_lesson.ipynb").read_bytes()
    (exercises / "01_lesson.ipynb").unlink()
    build_exercises(solutions, exercises)
    assert (exercises / "01_lesson.ipynb").read_bytes() == first


def _cli(solutions: Path, exercises: Path, *extra: str) -> int:
    return main(
        ["build-exercises", "--solutions", str(solutions), "--exercises", str(exercises), *extra]
    )


def test_check_detects_stale_exercise(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    solutions, exercises = dirs
    assert _cli(solutions, exercises) == 0
    solution = nbformat.read(solutions / "02_lesson.ipynb", as_version=4)
    solution.cells[0].source += "\nA new sentence."
    _write(solution, solutions / "02_lesson.ipynb")
    capsys.readouterr()

    assert _cli(solutions, exercises, "--check") == 1
    out = capsys.readouterr().out
    assert "02_lesson.ipynb" in out and "stale" in out
    assert "01_lesson.ipynb" not in out
    assert "python -m course_lib build-exercises" in out

    assert _cli(solutions, exercises) == 0
    assert "wrote" in capsys.readouterr().out
    assert _cli(solutions, exercises, "--check") == 0


def test_check_detects_hand_edited_exercise(dirs: tuple[Path, Path]) -> None:
    solutions, exercises = dirs
    build_exercises(solutions, exercises)
    exercise = nbformat.read(exercises / "01_lesson.ipynb", as_version=4)
    exercise.cells[1].outputs = [new_output("stream", name="stdout", text="leak\n")]
    _write(exercise, exercises / "01_lesson.ipynb")
    assert build_exercises(solutions, exercises, check=True) == [str(exercises / "01_lesson.ipynb")]


def test_check_detects_missing_exercise(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    solutions, exercises = dirs
    build_exercises(solutions, exercises)
    (exercises / "01_lesson.ipynb").unlink()
    capsys.readouterr()

    assert build_exercises(solutions, exercises, check=True) == [str(exercises / "01_lesson.ipynb")]
    assert _cli(solutions, exercises, "--check") == 1
    assert "missing" in capsys.readouterr().out
    assert not (exercises / "01_lesson.ipynb").exists()  # --check writes nothing

    assert _cli(solutions, exercises) == 0
    assert _cli(solutions, exercises, "--check") == 0


def test_check_detects_extra_exercise(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    solutions, exercises = dirs
    build_exercises(solutions, exercises)
    _write(_solution_notebook(), exercises / "99_orphan.ipynb")
    capsys.readouterr()

    assert build_exercises(solutions, exercises, check=True) == [str(exercises / "99_orphan.ipynb")]
    assert _cli(solutions, exercises, "--check") == 1
    assert "99_orphan.ipynb" in capsys.readouterr().out
    assert (exercises / "99_orphan.ipynb").exists()

    assert _cli(solutions, exercises) == 0  # a build removes exercises that have no solution
    assert not (exercises / "99_orphan.ipynb").exists()
    assert _cli(solutions, exercises, "--check") == 0


def test_check_on_never_built_exercises_folder(dirs: tuple[Path, Path]) -> None:
    solutions, exercises = dirs
    assert build_exercises_cli(solutions, exercises, check=True) == 1
    assert not exercises.exists()


def test_only_top_level_notebooks_are_used(dirs: tuple[Path, Path]) -> None:
    solutions, exercises = dirs
    _write(_solution_notebook(), solutions / ".ipynb_checkpoints" / "01_lesson-checkpoint.ipynb")
    _write(_solution_notebook(), solutions / "sub" / "03_nested.ipynb")
    (solutions / "notes.txt").write_text("### BEGIN SOLUTION\n", encoding="utf-8")
    written = build_exercises(solutions, exercises)
    assert sorted(Path(p).name for p in written) == ["01_lesson.ipynb", "02_lesson.ipynb"]
    assert sorted(p.name for p in exercises.iterdir()) == ["01_lesson.ipynb", "02_lesson.ipynb"]


def test_missing_solutions_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(tmp_path / "nope", tmp_path / "exercises") == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not found" in err
    with pytest.raises(FileNotFoundError):
        build_exercises(tmp_path / "nope", tmp_path / "exercises")


def test_bad_markers_in_cli_report_error(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    solutions, exercises = dirs
    bad = _solution_notebook()
    bad.cells[1].source = "def f():\n    ### BEGIN SOLUTION\n    return 1"
    _write(bad, solutions / "03_bad.ipynb")
    assert _cli(solutions, exercises) == 2
    err = capsys.readouterr().err
    assert "03_bad.ipynb" in err and "cell 1 (0-based)" in err and "line 2" in err
    assert not exercises.exists()  # nothing written when any solution is broken
    with pytest.raises(ExerciseMarkerError):
        build_exercises(solutions, exercises, check=True)


# --- the repository itself -------------------------------------------------------------------


def test_repo_exercises_in_sync_with_solutions() -> None:
    solutions, exercises = REPO_ROOT / "solutions", REPO_ROOT / "exercises"
    if not solutions.is_dir():  # a fresh clone drops empty folders: then there must be no exercises
        assert sorted(exercises.glob("*.ipynb")) == []
        return
    stale = build_exercises(solutions, exercises, check=True)
    assert stale == [], (
        f"exercises/ out of date: {stale}; run `python -m course_lib build-exercises`"
    )


def test_unreadable_solution_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "broken.ipynb").write_text("{}", encoding="utf-8")
    assert _cli(tmp_path / "solutions", tmp_path / "exercises") == 2
    assert "broken.ipynb" in capsys.readouterr().err
