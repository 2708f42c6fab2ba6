"""Make learner exercises from instructor solutions: ``solutions/*.ipynb`` -> ``exercises/*.ipynb``.

Solution notebooks mark the parts a learner must write, nbgrader style::

    def softmax(x):
        ### BEGIN SOLUTION
        e = np.exp(x - x.max())
        return e / e.sum()
        ### END SOLUTION

In the exercise, each region (markers included) becomes ``raise NotImplementedError()`` in code
cells and ``YOUR ANSWER HERE`` in markdown cells, indented like the BEGIN marker. Outputs and
execution counts are cleared so exercises never leak answers through printed results.

Only the solutions are edited by hand; ``python -m course_lib build-exercises`` regenerates the
exercises and ``--check`` (used by CI) fails when they are out of date.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"
CODE_STUB = "raise NotImplementedError()"
MARKDOWN_STUB = "YOUR ANSWER HERE"
FIX_COMMAND = "python -m course_lib build-exercises"

_STUBS = {"code": CODE_STUB, "markdown": MARKDOWN_STUB}


class ExerciseMarkerError(ValueError):
    """A solution notebook has unbalanced or nested ``### BEGIN/END SOLUTION`` markers."""


def strip_solutions(source: str, cell_type: str, where: str) -> str:
    """Replace every BEGIN/END SOLUTION region of one cell's source by the exercise stub.

    ``cell_type`` is ``"code"`` or ``"markdown"`` (it picks the stub); ``where`` names the cell in
    error messages, e.g. ``"solutions/01.ipynb, cell 3 (0-based)"``. Lines outside the regions
    are kept verbatim. Raises :class:`ExerciseMarkerError` on nested or unbalanced markers.
    """
    if cell_type not in _STUBS:
        raise ValueError(f"{where}: cannot strip solutions from a {cell_type!r} cell")
    stub = _STUBS[cell_type]
    out: list[str] = []
    begin_line = 0  # 1-based line number of the open BEGIN marker; 0 when outside a region
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN_MARKER:
            if begin_line:
                raise ExerciseMarkerError(
                    f"{where}, line {number}: nested {BEGIN_MARKER!r} inside the region "
                    f"opened on line {begin_line} (line numbers are 1-based within the cell)"
                )
            begin_line = number
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + stub)
        elif marker == END_MARKER:
            if not begin_line:
                raise ExerciseMarkerError(
                    f"{where}, line {number}: {END_MARKER!r} without a matching "
                    f"{BEGIN_MARKER!r} (line numbers are 1-based within the cell)"
                )
            begin_line = 0
        elif not begin_line:
            out.append(line)
    if begin_line:
        raise ExerciseMarkerError(
            f"{where}, line {begin_line}: {BEGIN_MARKER!r} is never closed by {END_MARKER!r} "
            "(line numbers are 1-based within the cell)"
        )
    return "\n".join(out)


def make_exercise(nb: nbformat.NotebookNode, name: str = "<notebook>") -> nbformat.NotebookNode:
    """Return a new notebook: ``nb`` with solutions stripped and code outputs cleared.

    ``name`` (usually the file path) is used in error messages. Notebook metadata, cell
    metadata and cell ids are kept; ``nb`` itself is not modified.
    """
    exercise = copy.deepcopy(nb)
    for index, cell in enumerate(exercise.cells):
        if cell.cell_type in _STUBS:
            cell.source = strip_solutions(
                cell.source, cell.cell_type, f"{name}, cell {index} (0-based)"
            )
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return exercise


@dataclass(frozen=True)
class _Change:
    """One exercise file that differs from what its solution produces."""

    path: Path
    reason: str  # "stale", "missing" or "extra" (an exercise with no solution)
    notebook: nbformat.NotebookNode | None  # what to write; None for "extra" (the file is removed)


def _notebooks(folder: Path) -> list[Path]:
    """The ``*.ipynb`` files directly in ``folder`` (no checkpoints, no hidden files)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.ipynb") if p.is_file() and not p.name.startswith("."))


def _render(nb: nbformat.NotebookNode) -> str:
    """The exact text ``nbformat.write`` puts in the file (so ``--check`` compares like for like)."""
    text = nbformat.writes(nb, version=nbformat.NO_CONVERT)
    return text if text.endswith("\n") else text + "\n"


def _plan(solutions_dir: Path, exercises_dir: Path) -> list[_Change]:
    """Work out which exercise files are stale, missing or extra; writes nothing."""
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"solutions folder not found: {solutions_dir}")
    if exercises_dir.resolve() == solutions_dir.resolve():
        raise ValueError(
            f"the exercises folder must differ from the solutions folder: {solutions_dir}"
        )
    changes: list[_Change] = []
    names: set[str] = set()
    for solution in _notebooks(solutions_dir):
        names.add(solution.name)
        try:
            nb = nbformat.read(solution, as_version=4)
        except (ValueError, nbformat.ValidationError) as exc:  # not JSON, or not a notebook
            raise ValueError(f"{solution}: cannot read notebook: {exc}") from exc
        if not isinstance(nb.get("cells"), list):
            raise ValueError(f"{solution}: not a notebook (no 'cells' list)")
        exercise = make_exercise(nb, name=str(solution))
        target = exercises_dir / solution.name
        if not target.is_file():
            changes.append(_Change(target, "missing", exercise))
        elif target.read_bytes() != _render(exercise).encode("utf-8"):
            changes.append(_Change(target, "stale", exercise))
    for exercise in _notebooks(exercises_dir):
        if exercise.name not in names:
            changes.append(_Change(exercise, "extra", None))
    return sorted(changes, key=lambda c: c.path.name)


def _apply(changes: list[_Change], exercises_dir: Path) -> None:
    """Write stale/missing exercises (through ``nbformat.write``) and remove extra ones."""
    exercises_dir.mkdir(parents=True, exist_ok=True)
    for change in changes:
        if change.notebook is None:
            change.path.unlink()
            continue
        with open(change.path, "w", encoding="utf-8", newline="") as fh:
            nbformat.write(change.notebook, fh, version=nbformat.NO_CONVERT)


def build_exercises(
    solutions_dir: str | Path, exercises_dir: str | Path, check: bool = False
) -> list[str]:
    """Bring ``exercises_dir`` in sync with ``solutions_dir``; return the paths that were out of date.

    With ``check=True`` nothing is written: the returned paths are the exercises that are stale,
    missing, or extra (no matching solution). Otherwise they are the files written or removed.
    """
    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    changes = _plan(solutions_dir, exercises_dir)
    if not check:
        _apply(changes, exercises_dir)
    return [str(c.path) for c in changes]


def build_exercises_cli(solutions: str | Path, exercises: str | Path, check: bool = False) -> int:
    """``course-lib build-exercises``: 0 when in sync (or written), 1 when ``--check`` finds drift, 2 on bad input."""
    solutions_dir, exercises_dir = Path(solutions), Path(exercises)
    try:
        changes = _plan(solutions_dir, exercises_dir)
    except (FileNotFoundError, ValueError) as exc:  # ExerciseMarkerError is a ValueError
        print(f"build-exercises: error: {exc}", file=sys.stderr)
        return 2
    if check:
        if not changes:
            print(f"{exercises_dir} is in sync with {solutions_dir}")
            return 0
        print(f"{exercises_dir} is out of date with {solutions_dir}:")
        for change in changes:
            detail = "extra, no matching solution" if change.reason == "extra" else change.reason
            print(f"  {change.path} ({detail})")
        fix = FIX_COMMAND
        if str(solutions) != "solutions" or str(exercises) != "exercises":
            fix += f" --solutions {solutions} --exercises {exercises}"
        print(f"fix: run `{fix}`")
        return 1
    _apply(changes, exercises_dir)
    for change in changes:
        print(f"{'removed' if change.notebook is None else 'wrote'} {change.path}")
    if not changes:
        print(f"{exercises_dir} already in sync with {solutions_dir}")
    return 0
