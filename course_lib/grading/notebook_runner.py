"""Run one submitted notebook in a Jupyter kernel and grade its tasks.

The grader (:mod:`course_lib.grading.grader`) starts one process per notebook running
``python -m course_lib.grading.notebook_runner``, with a memory limit that the kernel inherits.
This module executes the learner's code cells in order in a fresh kernel (in a scratch folder,
so nothing the notebook writes lands in the submission), then runs the grader's own check for
every task of the chapter in the same kernel, on whatever the learner's cells defined. The
learner's own self-check cells are executed like any other cell but do not count: deleting,
editing or re-ordering them changes nothing.

Nothing the learner does stops the run. A cell that raises is recorded and the next one runs.
A cell that runs past its time limit is interrupted (and the kernel restarted if the interrupt
does not stop it). A kernel that dies (out of memory, ``os._exit``, a segfault) is restarted and
the cells that ran before are replayed. When the notebook's own time budget is spent, the
remaining cells are skipped and the tasks are graded on what was defined by then.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from traitlets import default

#: Restarts allowed per notebook before the grader stops executing it.
MAX_RESTARTS = 3
#: Seconds a kernel gets to answer a trivial cell after an interrupted one.
RESPONSIVE_TIMEOUT = 15
TIMEOUT_ENAME = "CellTimeoutError"

_GRADE_CELL = """\
from course_lib.grading import grade_task as __course_grade_task
__course_grade_task({task!r}, globals(), hidden_seed={seed!r}).save({out!r}, {task!r})
"""


class _CurrentEnvSpecs(KernelSpecManager):
    """Kernel specs where "python3" is always this interpreter (as nbval's --current-env), so
    a user-wide kernel pointing at another Python cannot change what gets graded."""

    def get_kernel_spec(self, kernel_name: str):
        if kernel_name == "python3":
            import ipykernel.kernelspec as spec

            return self.kernel_spec_class(resource_dir=spec.RESOURCES, **spec.get_kernel_dict())
        return super().get_kernel_spec(kernel_name)


class CurrentEnvKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, with "python3" pinned to this interpreter."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return _CurrentEnvSpecs(data_dir=self.data_dir)


@dataclass
class CellEvent:
    """Something that went wrong in one cell: its number counted from 1, markdown cells included
    (as a learner counts them in JupyterLab); 0 for the kernel as a whole."""

    cell: int
    kind: str  # "error", "timeout", "kernel died", "skipped"
    message: str


@dataclass
class NotebookReport:
    """What happened to one notebook: its cell events and one result per task."""

    notebook: str
    results: list[dict] = field(default_factory=list)
    events: list[CellEvent] = field(default_factory=list)
    cells_run: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def error_result(task_id: str, message: str, status: str = "error") -> dict:
    """A task result the grader makes itself (the check could not run)."""
    from course_lib.grading import TASKS

    task = TASKS[task_id]
    return {"task": task_id, "name": task.check.task_name, "passed": False, "points": 0,
            "max_points": task.points, "message": message, "status": status}


class _Kernel:
    """One kernel running one notebook's cells: execute with a timeout, report what happened."""

    def __init__(self, nb: nbformat.NotebookNode, workdir: Path) -> None:
        self.nb = nb
        self.workdir = workdir
        self.reply: dict | None = None
        self.client = NotebookClient(
            nb, kernel_name="python3", kernel_manager_class=CurrentEnvKernelManager,
            allow_errors=True, interrupt_on_timeout=True, startup_timeout=120,
            error_on_timeout={"ename": TIMEOUT_ENAME, "evalue": "", "traceback": []},
            on_cell_executed=self._keep_reply, record_timing=False,
            extra_arguments=["--log-level=ERROR"])  # not ipykernel's TCP warning
        self._context = None

    def _keep_reply(self, cell, cell_index, execute_reply) -> None:
        self.reply = execute_reply

    def start(self) -> None:
        self._context = self.client.setup_kernel(cwd=str(self.workdir))
        self._context.__enter__()

    def stop(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            try:
                context.__exit__(None, None, None)
            except Exception:  # a dead kernel may fail to shut down cleanly; it is gone anyway
                pass

    def restart(self) -> None:
        self.stop()
        self.client.km = None
        self.client.kc = None
        self.start()

    def run(self, index: int, timeout: float) -> tuple[str, str]:
        """Execute cell ``index``: ("ok" | "error" | "timeout" | "died", message)."""
        self.client.timeout = max(1, int(timeout))
        self.reply = None
        cell = self.nb.cells[index]
        try:
            self.client.execute_cell(cell, index)
        except DeadKernelError:
            return "died", "the kernel died (out of memory, or the code crashed the process)"
        content = (self.reply or {}).get("content", {})
        if content.get("status") != "error":
            return "ok", ""
        if content.get("ename") == TIMEOUT_ENAME:
            return "timeout", f"still running after {self.client.timeout} s; interrupted"
        evalue = str(content.get("evalue", "")).strip().splitlines()
        return "error", f"{content.get('ename', 'Error')}: {evalue[0] if evalue else ''}".rstrip(": ")

    def responsive(self) -> bool:
        """True if the kernel runs a trivial cell (after an interrupt it may still be stuck)."""
        self.nb.cells.append(nbformat.v4.new_code_cell("pass"))
        try:
            return self.run(len(self.nb.cells) - 1, RESPONSIVE_TIMEOUT)[0] == "ok"
        finally:
            self.nb.cells.pop()


def run_notebook(path: Path, task_ids: Sequence[str], cell_timeout: float = 120,
                 timeout: float = 900, hidden_seed: int | None = None) -> NotebookReport:
    """Execute ``path`` and grade ``task_ids`` in its kernel; never raises on the learner's code."""
    start = time.monotonic()
    report = NotebookReport(notebook=Path(path).name)
    try:
        nb = nbformat.read(str(path), as_version=4)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("it has no list of cells")
    except Exception as exc:  # not JSON, not a notebook, unreadable
        report.results = [error_result(t, f"the notebook could not be read: {exc}")
                          for t in task_ids]
        return report
    learner_cells = [i for i, c in enumerate(nb.cells)
                     if c.get("cell_type") == "code" and str(c.get("source", "")).strip()]
    with tempfile.TemporaryDirectory(prefix="course-grade-") as scratch:
        workdir = Path(scratch)
        kernel = _Kernel(nb, workdir)
        kernel.start()
        try:
            done = _run_learner_cells(kernel, learner_cells, cell_timeout, start + timeout, report)
            _grade_tasks(kernel, task_ids, done, cell_timeout, hidden_seed,
                         workdir / ".grades.jsonl", report)
        finally:
            kernel.stop()
    report.wall_s = round(time.monotonic() - start, 2)
    return report


class _GiveUp(Exception):
    """The kernel keeps dying or hanging: stop executing this notebook."""


def _recover(kernel: _Kernel, outcome: str, done: list[int], cell_timeout: float,
             report: NotebookReport) -> None:
    """After a timeout or a death: make sure the kernel is usable again, replaying the cells
    that ran before when it had to be restarted."""
    if outcome == "timeout" and kernel.responsive():
        return
    if sum(e.kind == "restart" for e in report.events) >= MAX_RESTARTS:
        raise _GiveUp
    report.events.append(CellEvent(0, "restart", f"kernel restarted; replaying {len(done)} cells"))
    kernel.restart()
    for index in done:
        if kernel.run(index, cell_timeout)[0] in ("timeout", "died"):
            raise _GiveUp


def _run_learner_cells(kernel: _Kernel, cells: list[int], cell_timeout: float, deadline: float,
                       report: NotebookReport) -> list[int]:
    """Run the learner's cells in order; return those that ran to their end (with or without an
    exception), which are the ones replayed after a restart."""
    done: list[int] = []
    for position, index in enumerate(cells):
        remaining = deadline - time.monotonic()
        if remaining < 1:
            report.events.append(CellEvent(index + 1, "skipped", f"the notebook's time budget ran "
                                           f"out; {len(cells) - position} cells were not run"))
            return done
        outcome, message = kernel.run(index, min(cell_timeout, remaining))
        report.cells_run += 1
        if outcome in ("ok", "error"):
            done.append(index)
            if outcome == "error":
                report.events.append(CellEvent(index + 1, "error", message))
            continue
        report.events.append(CellEvent(index + 1, "timeout" if outcome == "timeout" else
                                       "kernel died", message))
        try:
            _recover(kernel, outcome, done, cell_timeout, report)
        except _GiveUp:
            report.events.append(CellEvent(index + 1, "skipped", "the kernel kept failing; "
                                           f"{len(cells) - position - 1} cells were not run"))
            return done
    return done


def _grade_tasks(kernel: _Kernel, task_ids: Sequence[str], done: list[int], cell_timeout: float,
                 hidden_seed: int | None, out: Path, report: NotebookReport) -> None:
    """Run the grader's check of each task in the learner's kernel, one cell per task."""
    nb = kernel.nb
    first = len(nb.cells)
    for task_id in task_ids:
        nb.cells.append(nbformat.v4.new_code_cell(
            _GRADE_CELL.format(task=task_id, seed=hidden_seed, out=str(out))))
    for offset, task_id in enumerate(task_ids):
        outcome, message = kernel.run(first + offset, cell_timeout)
        if outcome == "timeout":
            report.results.append(error_result(
                task_id, f"the check was still running after {int(cell_timeout)} s (an "
                "infinite loop, or code far too slow?); interrupted"))
        elif outcome == "died":
            report.results.append(error_result(task_id, f"the check crashed the kernel: {message}"))
        else:
            saved = _read_saved(out).get(task_id)
            report.results.append(saved or error_result(
                task_id, f"the grader could not run this check ({message or 'no result'})"))
            continue
        try:
            _recover(kernel, outcome, done, cell_timeout, report)
        except _GiveUp:
            for rest in task_ids[offset + 1:]:
                report.results.append(error_result(rest, "not graded: the kernel kept failing"))
            return


def _read_saved(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    saved = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            saved[row["task"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    return saved


def limit_memory(memory_gb: float) -> bool:
    """Cap this process's address space (the kernel it starts inherits the cap), so a notebook
    that allocates without bound gets a MemoryError instead of taking the machine down. False
    where the platform has no such limit (e.g. macOS)."""
    if memory_gb <= 0:
        return False
    import resource

    limit = int(memory_gb * 1024 ** 3)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run and grade one notebook (used by "
                                     "`course-lib grade`; one process per notebook).")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--tasks", nargs="+", required=True, help="task ids, e.g. 01.pack_int4")
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--cell-timeout", type=float, default=120)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--hidden-seed", type=int, default=None)
    parser.add_argument("--memory-gb", type=float, default=0, help="address-space limit, 0 = none")
    args = parser.parse_args(argv)
    limit_memory(args.memory_gb)
    report = run_notebook(args.notebook, args.tasks, args.cell_timeout, args.timeout,
                          args.hidden_seed)
    args.out.write_text(json.dumps(report.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
