"""A class of fixture submissions for the grader, each graded to known points.

Most are chapter 1 notebooks made from the real solution and exercise notebooks with one edit,
so they stay in step with the course; ``hardcoded`` is a chapter 8 notebook whose answers are a
table of the visible cases' results. Chapters graded: 01 (10 points) and 08 (5 points).
"""

from __future__ import annotations

from pathlib import Path

import nbformat

from course_lib.cost import cost_per_million_tokens
from course_lib.grading import check_cost

REPO = Path(__file__).resolve().parents[1]
CH01 = "01_quantization_math.ipynb"
CH08 = "08_deployment_and_cost.ipynb"

#: Points per check id that each fixture student must get without hidden cases.
ZERO_08 = {"08.latency_metrics": 0, "08.cost": 0, "08.request_validator": 0}
ALL_01 = {"01.symmetric_quantize": 2, "01.dequantize": 1, "01.asymmetric_quantize": 2,
          "01.per_group_quantize": 3, "01.pack_int4": 2}
EXPECTED = {
    "solved": {**ALL_01, **ZERO_08},
    "unsolved": {**dict.fromkeys(ALL_01, 0), **ZERO_08},
    "partial": {**ALL_01, "01.asymmetric_quantize": 0, "01.per_group_quantize": 0,
                "01.pack_int4": 0, **ZERO_08},
    "infinite_loop": {**ALL_01, "01.pack_int4": 0, **ZERO_08},
    "syntax_error": {**ALL_01, "01.asymmetric_quantize": 0, **ZERO_08},
    "deleted_check": {**ALL_01, **ZERO_08},
    "reordered": {**ALL_01, **ZERO_08},
    "kernel_crash": {**ALL_01, **ZERO_08},
    "hardcoded": {**dict.fromkeys(ALL_01, 0), **ZERO_08, "08.cost": 1},
}


def _cell_with(nb, text: str, kind: str = "code") -> int:
    found = [i for i, c in enumerate(nb.cells) if c.cell_type == kind and text in c.source]
    assert len(found) == 1, f"expected one {kind} cell containing {text!r}, found {found}"
    return found[0]


def _write(root: Path, student: str, name: str, nb) -> None:
    folder = root / student
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(folder / name))


def _solution():
    return nbformat.read(str(REPO / "solutions" / CH01), as_version=4)


def _exercise():
    return nbformat.read(str(REPO / "exercises" / CH01), as_version=4)


def hardcoded_cost_notebook():
    """A chapter 8 notebook that returns the visible cases' answers from a table (and raises
    ValueError on the visible impossible inputs), and a made-up number for anything else."""
    answers, impossible = {}, []

    def record(*args):
        try:
            answers[args] = cost_per_million_tokens(*args)
        except ValueError:
            impossible.append(args)
            raise
        return answers[args]

    assert check_cost(record, raise_on_fail=False).passed
    table = "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in answers.items()) + "}"
    source = (f"ANSWERS = {table}\nIMPOSSIBLE = {impossible!r}\n\n\n"
              "def cost_per_million_tokens(*args):\n"
              "    if args in IMPOSSIBLE:\n        raise ValueError('impossible input')\n"
              "    return ANSWERS.get(args, 1.0)\n")
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Chapter 8, the cost exercise (answers copied in)"),
        nbformat.v4.new_code_cell(source),
        nbformat.v4.new_code_cell("from course_lib.grading import check_cost\n"
                                  "check_cost(cost_per_million_tokens)"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}})


def build_fixture_submissions(root: Path) -> Path:
    """Write the class into ``root/<student>/`` and return ``root``."""
    _write(root, "solved", CH01, _solution())
    _write(root, "unsolved", CH01, _exercise())

    partial, solution = _exercise(), _solution()
    for name in ("def symmetric_quantize(", "def dequantize("):
        partial.cells[_cell_with(partial, name)] = solution.cells[_cell_with(solution, name)]
    _write(root, "partial", CH01, partial)

    looping = _solution()
    cell = looping.cells[_cell_with(looping, "def pack_int4(")]
    cell.source = cell.source.replace(
        "-> torch.Tensor:\n", "-> torch.Tensor:\n    while True:  # never returns\n        pass\n", 1)
    _write(root, "infinite_loop", CH01, looping)

    broken = _solution()
    cell = broken.cells[_cell_with(broken, "def asymmetric_quantize(")]
    cell.source = cell.source.replace("def asymmetric_quantize(", "def asymmetric_quantize(:", 1)
    _write(root, "syntax_error", CH01, broken)

    deleted = _solution()
    del deleted.cells[_cell_with(deleted, "check_per_group_quantize(per_group_quantize)")]
    _write(root, "deleted_check", CH01, deleted)

    # each self-check moved before its definition, and one definition cell duplicated
    reordered = _solution()
    for check, definition in (("check_dequantize(dequantize)", "def dequantize("),
                              ("check_pack_int4(pack_int4", "def pack_int4(")):
        c, d = _cell_with(reordered, check), _cell_with(reordered, definition)
        reordered.cells.insert(d, reordered.cells.pop(c))
    d = _cell_with(reordered, "def symmetric_quantize(")
    reordered.cells.append(nbformat.v4.new_code_cell(reordered.cells[d].source))
    _write(root, "reordered", CH01, reordered)

    crashing = _solution()
    crashing.cells.insert(_cell_with(crashing, "check_dequantize(dequantize)") + 1,
                          nbformat.v4.new_code_cell("import os\nos._exit(1)  # kills the kernel"))
    _write(root, "kernel_crash", CH01, crashing)

    _write(root, "hardcoded", CH08, hardcoded_cost_notebook())
    return root
