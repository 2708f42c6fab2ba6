"""Every committed notebook is clean: no outputs, no execution counts, python3 kernel, goals first."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_FOLDERS = ("notebooks", "solutions", "exercises")


def repo_notebooks(root: Path = REPO_ROOT) -> list[Path]:
    """All ``.ipynb`` files under the notebook folders of ``root`` (checkpoints skipped)."""
    found: list[Path] = []
    for folder in NOTEBOOK_FOLDERS:
        if (root / folder).is_dir():
            found += (
                p for p in (root / folder).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
            )
    return sorted(found)


def notebook_problems(nb: nbformat.NotebookNode, name: str) -> list[str]:
    """Everything that makes ``nb`` unfit to commit, one message per problem naming notebook and cell."""
    problems: list[str] = []
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"{name}: kernelspec name is {kernel!r}, expected 'python3'")
    if not nb.cells:
        problems.append(
            f"{name}: has no cells (the first cell must be markdown with the learning goals)"
        )
    elif nb.cells[0].cell_type != "markdown":
        problems.append(
            f"{name}, cell 0: is a {nb.cells[0].cell_type} cell; the first cell must be markdown "
            "(learning goals come first)"
        )
    elif "learning goals" not in nb.cells[0].source.lower():
        problems.append(f"{name}, cell 0: the opening markdown cell does not state the learning goals")
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and ".cuda(" in cell.source:
            problems.append(f"{name}, cell {index} (0-based): calls .cuda(); use course_lib.runtime.get_device()")
        if cell.get("outputs"):
            problems.append(
                f"{name}, cell {index} (0-based): has {len(cell.outputs)} output(s); clear outputs"
            )
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            problems.append(
                f"{name}, cell {index} (0-based): execution_count is {cell.execution_count}, expected None"
            )
    return problems


def test_repo_notebooks_are_clean() -> None:
    problems: list[str] = []
    for path in repo_notebooks():
        nb = nbformat.read(path, as_version=4)
        problems += notebook_problems(nb, str(path.relative_to(REPO_ROOT)))
    assert not problems, "notebooks are not clean (clear outputs before committing):\n" + "\n".join(
        problems
    )


def test_repo_notebook_cells_have_ids() -> None:
    """nbformat 4.5 wants an id on every cell (nbformat.read adds missing ones silently, and
    warns that this will become an error), so check the files as written."""
    missing = []
    for path in repo_notebooks():
        raw = json.loads(path.read_text())
        if (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5):
            missing += [f"{path.relative_to(REPO_ROOT)}, cell {i}" for i, cell in
                        enumerate(raw["cells"]) if "id" not in cell]
    assert not missing, "cells without an id (nbformat 4.5):\n" + "\n".join(missing)


# --- the checker itself catches what it should ----------------------------------------------


def _clean_notebook() -> nbformat.NotebookNode:
    nb = new_notebook(
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        }
    )
    nb.cells = [new_markdown_cell("# Title\n\n**Learning goals.** x"), new_code_cell("x = 1")]
    return nb


def test_checker_accepts_clean_notebook() -> None:
    assert notebook_problems(_clean_notebook(), "ok.ipynb") == []


def test_checker_flags_outputs_and_execution_count() -> None:
    nb = _clean_notebook()
    nb.cells[1].execution_count = 7
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="1\n")]
    problems = notebook_problems(nb, "dirty.ipynb")
    assert len(problems) == 2
    assert all("dirty.ipynb, cell 1" in p for p in problems)
    assert any("output" in p for p in problems) and any("execution_count" in p for p in problems)


def test_checker_flags_kernel_and_first_cell() -> None:
    nb = _clean_notebook()
    nb.metadata.kernelspec.name = "conda-env"
    nb.cells.reverse()
    problems = notebook_problems(nb, "bad.ipynb")
    assert any("kernelspec" in p and "conda-env" in p for p in problems)
    assert any("bad.ipynb, cell 0" in p and "markdown" in p for p in problems)
    nb.metadata.pop("kernelspec")
    nb.cells = []
    assert len(notebook_problems(nb, "empty.ipynb")) == 2


def test_repo_notebooks_finds_nested_and_skips_checkpoints(tmp_path: Path) -> None:
    for rel in (
        "notebooks/a.ipynb",
        "notebooks/part2/b.ipynb",
        "solutions/.ipynb_checkpoints/c-checkpoint.ipynb",
        "other/d.ipynb",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(_clean_notebook(), tmp_path / rel)
    found = [p.relative_to(tmp_path).as_posix() for p in repo_notebooks(tmp_path)]
    assert found == ["notebooks/a.ipynb", "notebooks/part2/b.ipynb"]


def test_checker_flags_missing_goals_and_cuda_calls() -> None:
    nb = _clean_notebook()
    nb.cells[0].source = "# Title only"
    nb.cells[1].source = "model.cuda()"
    problems = notebook_problems(nb, "bad.ipynb")
    assert any("learning goals" in p for p in problems)
    assert any("cell 1" in p and ".cuda()" in p for p in problems)
