"""Run one submitted notebook in a sandboxed Jupyter kernel and grade its tasks from outside.

The grader (:mod:`course_lib.grading.grader`) starts one process per notebook running
``python -m course_lib.grading.notebook_runner``; the hidden seed and a report token come on
its standard input, never in its arguments or environment. This process is the trusted one:
it holds the checks, the seed and the expected answers. It executes the learner's code cells
in order in a fresh kernel, launched inside the platform's sandbox
(:mod:`course_lib.grading.sandbox`) with an allow-listed environment, a private HOME and a
scratch folder as its working directory; then, for every task of the chapter, it runs a cell
that serves the notebook's definitions over a Unix socket (:mod:`course_lib.grading.oracle`)
and runs the check here, calling the learner's functions through proxies
(:mod:`course_lib.grading.remote`). The learner's own self-check cells are executed like any
other cell but do not count, and nothing in the kernel can change a verdict except the values
its functions return.

Nothing the learner does stops the run. A cell that raises is recorded and the next one runs.
A cell that runs past its time limit is interrupted (and the kernel restarted if the interrupt
does not stop it). A kernel that dies (out of memory, ``os._exit``, a segfault) is restarted and
the cells that ran before are replayed, within the notebook's time budget. When that budget is
spent, the remaining cells are skipped and the tasks are graded on what was defined by then.
Cell outputs are dropped as they arrive (a notebook that prints without end costs no memory);
every process the kernel started is killed when the notebook is done.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionComplete, DeadKernelError
from traitlets import default
from traitlets.config import Config

#: Restarts allowed per notebook before the grader stops executing it.
MAX_RESTARTS = 3
#: Seconds a kernel gets to answer a trivial cell after an interrupted one.
RESPONSIVE_TIMEOUT = 15
TIMEOUT_ENAME = "CellTimeoutError"

_SERVE_CELL = "import course_lib.grading.oracle as __course_oracle\n__course_oracle.serve({path!r})\n"
#: Seconds a serve cell may outlive its check (a serve cell gets two cell timeouts: one to
#: connect, importing the library if the notebook never did, and one for the check).
SERVE_GRACE = 10
#: Bytes of the kernel's standard error kept for the report (the tail).
STDERR_TAIL = 16 * 1024

#: Variables a graded kernel (and the runner) may inherit; everything else in the instructor's
#: environment (tokens, keys, the hidden seed) stays out.
ALLOWED_ENV = ("PATH", "HOME", "COURSE_CACHE_DIR", "XDG_CACHE_HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "VIRTUAL_ENV",
               "CONDA_PREFIX", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS", "TRITON_INTERPRET", "TMPDIR", "COURSE_FAST", "COURSE_MODE",
               "COURSE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
               "MPLBACKEND", "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM")


def allowed_env(environ: dict[str, str]) -> dict[str, str]:
    """The allow-listed part of ``environ``."""
    return {k: v for k, v in environ.items() if k in ALLOWED_ENV}


def model_cache() -> Path | None:
    """The instructor's cache of converted models (this process's view), if there is one."""
    from course_lib.models.gguf import cache_root

    root = cache_root()
    return root.resolve() if root.is_dir() else None


def share_model_cache(kernel_cache: Path) -> None:
    """A link in the kernel's own (writable) model cache to each complete conversion in the
    instructor's, so a notebook does not convert SmolLM2 again; the sandbox shows the
    instructor's cache read-only (``SandboxPolicy.readable``)."""
    from course_lib.models.gguf import is_complete

    root = model_cache()
    kernel_cache.mkdir(parents=True, exist_ok=True)
    for entry in sorted(root.iterdir()) if root is not None else ():
        if entry.is_dir() and is_complete(entry) and not (kernel_cache / entry.name).exists():
            (kernel_cache / entry.name).symlink_to(entry, target_is_directory=True)


def kernel_env(environ: dict[str, str], workdir: Path) -> dict[str, str]:
    """A graded kernel's environment: the allow-listed variables, and a private, empty HOME
    (so no IPython profile, Jupyter config or cache of the instructor's is used; converted
    models are shared read-only, see :func:`share_model_cache`)."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    share_model_cache(home / ".cache" / "course_lib")
    env = allowed_env(environ)
    env.update(HOME=str(home), IPYTHONDIR=str(home / ".ipython"), MPLCONFIGDIR=str(home / ".mpl"),
               XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               JUPYTER_CONFIG_DIR=str(home / ".jupyter"), JUPYTER_DATA_DIR=str(home / ".jupyter"),
               COURSE_CACHE_DIR=str(home / ".cache" / "course_lib"), PYTHONNOUSERSITE="1")
    return env


def kernel_manager_class(wrap: Callable[[list[str]], list[str]]) -> type:
    """nbclient's kernel manager with "python3" pinned to this interpreter (as nbval's
    --current-env: a user-wide kernel pointing at another Python cannot change what gets
    graded), launched through ``wrap`` (the sandbox), interrupted by message (the launched
    process is the sandbox's, not the kernel)."""
    import ipykernel.kernelspec as spec

    class Specs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str):
            if kernel_name == "python3":
                info = spec.get_kernel_dict()
                info.update(argv=wrap(list(info["argv"])), interrupt_mode="message")
                return self.kernel_spec_class(resource_dir=spec.RESOURCES, **info)
            return super().get_kernel_spec(kernel_name)

    class Manager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self) -> KernelSpecManager:
            return Specs(data_dir=self.data_dir)

    return Manager


CurrentEnvKernelManager = kernel_manager_class(lambda argv: argv)


class _QuietClient(NotebookClient):
    """Drops every output as it arrives: the runner needs only each cell's reply, and a
    notebook that prints without end must not grow the runner's memory."""

    def process_message(self, msg, cell, cell_index):
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            raise CellExecutionComplete()
        return None


@dataclass
class CellEvent:
    """Something that went wrong in one cell: its number counted from 1, markdown cells included
    (as a learner counts them in JupyterLab); 0 for the kernel as a whole."""

    cell: int
    kind: str  # "error", "timeout", "kernel died", "restart", "skipped", "sandbox"
    message: str


@dataclass
class NotebookReport:
    """What happened to one notebook: its cell events and one result per task. Events are also
    written to ``stream`` as they happen, so they survive a runner that gets killed."""

    notebook: str
    results: list[dict] = field(default_factory=list)
    events: list[CellEvent] = field(default_factory=list)
    cells_run: int = 0
    wall_s: float = 0.0
    sandbox: str = ""
    stream: Callable[[dict], None] | None = field(default=None, repr=False, compare=False)

    def event(self, cell: int, kind: str, message: str) -> None:
        ev = CellEvent(cell, kind, message[:1000])
        self.events.append(ev)
        if self.stream is not None:
            self.stream({"event": asdict(ev)})

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("stream", None)
        return data


def error_result(task_id: str, message: str, status: str = "error") -> dict:
    """A task result the grader makes itself (the check could not run)."""
    from course_lib.grading import TASKS

    task = TASKS[task_id]
    return {"task": task_id, "name": task.check.task_name, "passed": False, "points": 0,
            "max_points": task.points, "message": message, "status": status}


class _Kernel:
    """One kernel running one notebook's cells: execute with a timeout, report what happened."""

    def __init__(self, nb: nbformat.NotebookNode, workdir: Path, wrap=lambda argv: argv,
                 env: dict[str, str] | None = None) -> None:
        self.nb = nb
        self.workdir = workdir
        self.env = env
        self.reply: dict | None = None
        self.stderr: collections.deque[bytes] = collections.deque()
        self._stderr_bytes = 0
        config = Config({"KernelManager": {
            "transport": "ipc", "ip": str(workdir / "kernel"),
            "connection_file": str(workdir / "kernel.json")}})
        self.client = _QuietClient(
            nb, kernel_name="python3", kernel_manager_class=kernel_manager_class(wrap),
            allow_errors=True, interrupt_on_timeout=True, startup_timeout=120,
            error_on_timeout={"ename": TIMEOUT_ENAME, "evalue": "", "traceback": []},
            on_cell_executed=self._keep_reply, record_timing=False, config=config,
            extra_arguments=["--log-level=ERROR"])  # not ipykernel's TCP warning
        self._context = None

    def _keep_reply(self, cell, cell_index, execute_reply) -> None:
        self.reply = execute_reply

    def start(self) -> None:
        kwargs = {"cwd": str(self.workdir), "stdout": subprocess.DEVNULL,
                  "stderr": subprocess.PIPE}
        if self.env is not None:
            kwargs["env"] = self.env
        self._context = self.client.setup_kernel(**kwargs)
        self._context.__enter__()
        process = getattr(getattr(self.client.km, "provisioner", None), "process", None)
        if process is not None and process.stderr is not None:
            threading.Thread(target=self._drain, args=(process.stderr,), daemon=True).start()

    def _drain(self, pipe) -> None:
        """Keep the tail of the kernel's standard error (the sandbox says there why it killed
        the kernel); never block the kernel on a full pipe."""
        for chunk in iter(lambda: pipe.read1(65536) if hasattr(pipe, "read1") else
                          pipe.read(65536), b""):
            self.stderr.append(chunk)
            self._stderr_bytes += len(chunk)
            while self._stderr_bytes > STDERR_TAIL and len(self.stderr) > 1:
                self._stderr_bytes -= len(self.stderr.popleft())

    def stderr_lines(self, prefix: str) -> list[str]:
        text = b"".join(self.stderr).decode(errors="replace")
        return [line for line in text.splitlines() if line.startswith(prefix)]

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
        except Exception as exc:  # the kernel's channels broke in some other way
            return "died", f"the kernel stopped answering ({type(exc).__name__})"
        content = (self.reply or {}).get("content", {})
        if content.get("status") != "error":
            return "ok", ""
        if content.get("ename") == TIMEOUT_ENAME:
            return "timeout", f"still running after {self.client.timeout} s; interrupted"
        evalue = str(content.get("evalue", "")).strip().splitlines()
        message = f"{content.get('ename', 'Error')}: {evalue[0] if evalue else ''}".rstrip(": ")
        return "error", message[:500]

    def interrupt(self) -> None:
        """Send the kernel an interrupt request from any thread (a message on its control
        channel, signed with the session key; the kernel raises KeyboardInterrupt)."""
        import zmq
        from jupyter_client.session import Session as JupyterSession

        try:
            info = self.client.km.get_connection_info()
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(f"ipc://{info['ip']}-{info['control_port']}")
            key = info["key"] if isinstance(info["key"], bytes) else str(info["key"]).encode()
            JupyterSession(key=key, signature_scheme=info["signature_scheme"]).send(
                sock, "interrupt_request", {})
            time.sleep(0.2)
            sock.close()
        except Exception:  # the kernel is gone: nothing to interrupt
            pass

    def responsive(self) -> bool:
        """True if the kernel runs a trivial cell (after an interrupt it may still be stuck)."""
        self.nb.cells.append(nbformat.v4.new_code_cell("pass"))
        try:
            return self.run(len(self.nb.cells) - 1, RESPONSIVE_TIMEOUT)[0] == "ok"
        finally:
            self.nb.cells.pop()


def _sandbox_for(scratch: Path, hidden: Sequence[Path], memory_gb: float,
                 use_sandbox: bool = True):
    """(sandbox, wrap): the platform's sandbox and the function that wraps the kernel's
    command into it for this notebook."""
    from course_lib.grading import sandbox as sb

    box = sb.choose(use_sandbox)
    policy = sb.SandboxPolicy(
        scratch=scratch, hidden=tuple(Path(h) for h in hidden),
        memory_bytes=int(memory_gb * 1024 ** 3) if memory_gb > 0 else None,
        max_processes=MAX_PROCESSES, readable=tuple(p for p in [model_cache()] if p))
    if box.kind == "none":
        return box, (lambda argv: argv)
    # ipykernel exits when its parent is not JPY_PARENT_PID; inside a PID namespace it never is
    # (the sandbox's init is), and the sandbox already ends the kernel with the runner
    return box, (lambda argv: box.wrap(["env", "-u", "JPY_PARENT_PID", *argv], policy))


#: Tasks (processes and threads: the pids controller counts both) a graded kernel may have at
#: once, for its whole tree where the sandbox enforces it; torch starts a thread per core.
MAX_PROCESSES = max(512, 8 * (os.cpu_count() or 1))


def run_notebook(path: Path, task_ids: Sequence[str], cell_timeout: float = 120,
                 timeout: float = 900, hidden_seed: int | None = None,
                 hidden: Sequence[Path] = (), memory_gb: float = 0,
                 stream: Callable[[dict], None] | None = None,
                 use_sandbox: bool = True) -> NotebookReport:
    """Execute ``path`` in a sandboxed kernel and grade ``task_ids`` from this process; never
    raises on the learner's code. ``hidden`` are folders the kernel must not see."""
    start = time.monotonic()
    report = NotebookReport(notebook=Path(path).name, stream=stream)
    try:
        if Path(path).stat().st_size > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"it is {Path(path).stat().st_size / 1024 ** 2:.0f} MB, over the "
                             f"{MAX_NOTEBOOK_BYTES // 1024 ** 2} MB limit")
        nb = nbformat.read(str(path), as_version=4)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("it has no list of cells")
    except Exception as exc:  # not JSON, not a notebook, unreadable, too large
        report.results = [error_result(t, f"the notebook could not be read: {str(exc)[:300]}")
                          for t in task_ids]
        return report
    learner_cells = [i for i, c in enumerate(nb.cells)
                     if c.get("cell_type") == "code" and str(c.get("source", "")).strip()]
    with tempfile.TemporaryDirectory(prefix="course-grade-") as scratch:
        workdir = Path(scratch)
        box, wrap = _sandbox_for(workdir, hidden, memory_gb, use_sandbox)
        report.sandbox = box.summary
        kernel = _Kernel(nb, workdir, wrap, kernel_env(dict(os.environ), workdir))
        try:
            kernel.start()
        except Exception as exc:
            report.event(0, "kernel died", f"the kernel could not start: {str(exc)[:300]}")
            report.results = [error_result(t, "the grader could not start a kernel") for t in task_ids]
            return report
        try:
            deadline = start + timeout
            done = _run_learner_cells(kernel, learner_cells, cell_timeout, deadline, report)
            _grade_tasks(kernel, task_ids, done, cell_timeout, hidden_seed, deadline, report)
        finally:
            kernel.stop()
            for line in kernel.stderr_lines("course-sandbox:")[-3:]:
                report.event(0, "sandbox", line)
    report.wall_s = round(time.monotonic() - start, 2)
    return report


#: A notebook file larger than this is not run (a real one is well under 1 MB without outputs).
MAX_NOTEBOOK_BYTES = 20 * 1024 ** 2


class _GiveUp(Exception):
    """The kernel keeps dying or hanging: stop executing this notebook."""


def _recover(kernel: _Kernel, outcome: str, done: list[int], cell_timeout: float,
             deadline: float, report: NotebookReport) -> None:
    """After a timeout or a death: make sure the kernel is usable again, replaying the cells
    that ran before when it had to be restarted. Replays count against the notebook's budget."""
    if outcome == "timeout" and kernel.responsive():
        return
    if sum(e.kind == "restart" for e in report.events) >= MAX_RESTARTS:
        raise _GiveUp
    report.event(0, "restart", f"kernel restarted; replaying {len(done)} cells")
    kernel.restart()
    for index in done:
        remaining = deadline - time.monotonic()
        if remaining < 1 or kernel.run(index, min(cell_timeout, remaining))[0] in ("timeout",
                                                                                   "died"):
            raise _GiveUp


def _run_learner_cells(kernel: _Kernel, cells: list[int], cell_timeout: float, deadline: float,
                       report: NotebookReport) -> list[int]:
    """Run the learner's cells in order; return those that ran to their end (with or without an
    exception), which are the ones replayed after a restart."""
    done: list[int] = []
    for position, index in enumerate(cells):
        remaining = deadline - time.monotonic()
        if remaining < 1:
            report.event(index + 1, "skipped", f"the notebook's time budget ran out; "
                         f"{len(cells) - position} cells were not run")
            return done
        outcome, message = kernel.run(index, min(cell_timeout, remaining))
        report.cells_run += 1
        if outcome in ("ok", "error"):
            done.append(index)
            if outcome == "error":
                report.event(index + 1, "error", message)
            continue
        report.event(index + 1, "timeout" if outcome == "timeout" else "kernel died", message)
        try:
            _recover(kernel, outcome, done, cell_timeout, deadline, report)
        except _GiveUp:
            report.event(index + 1, "skipped", "the kernel kept failing; "
                         f"{len(cells) - position - 1} cells were not run")
            return done
    return done


def check_task(task_id: str, session, hidden_seed: int | None) -> dict:
    """Run one task's check here, on the learner's definitions reached through ``session``."""
    from course_lib.grading import TASKS
    from course_lib.grading.core import run_check

    task = TASKS[task_id]
    unavailable = getattr(task.check, "unavailable", None)
    if unavailable is not None and unavailable():
        return error_result(task_id, unavailable(), "missing")
    learner = [session.lookup(name) for name in task.names]
    missing = [name for name, obj in zip(task.names, learner, strict=True) if obj is None]
    if missing:
        return error_result(task_id, f"{', '.join(missing)} is not defined", "missing")
    result = run_check(task.check.task_name, task.points, task.check.body, *learner,
                       hidden_seed=hidden_seed)
    return {"task": task_id, **asdict(result)}


def _grade_one(kernel: _Kernel, listener: socket.socket, task_id: str, cell_timeout: float,
               hidden_seed: int | None) -> tuple[str, str, dict | None]:
    """Run one serve cell in the kernel while a thread runs the task's check against it:
    (the cell's outcome, its message, the result or None)."""
    from course_lib.grading.remote import GradingAborted, Session

    box: dict = {}

    def work() -> None:
        try:
            listener.settimeout(cell_timeout)
            conn, _ = listener.accept()
            box["conn"] = conn
            # the check's time starts when the kernel answers (its first serve cell may still
            # import the library)
            session = Session(conn, time.monotonic() + cell_timeout)
            box["result"] = check_task(task_id, session, hidden_seed)
            session.close()
        except GradingAborted as exc:
            box["aborted"] = exc
            if exc.timed_out:
                kernel.interrupt()  # stop the learner's code now, not at the cell's limit
        except OSError as exc:
            box["aborted"] = GradingAborted(f"the kernel never connected to the grader ({exc})")

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    kernel.nb.cells.append(nbformat.v4.new_code_cell(
        _SERVE_CELL.format(path=str(listener.getsockname()))))
    try:
        outcome, message = kernel.run(len(kernel.nb.cells) - 1, 2 * cell_timeout + SERVE_GRACE)
    finally:
        kernel.nb.cells.pop()
    worker.join(timeout=2)
    if worker.is_alive():  # the cell ended (or was stopped) without the check finishing
        conn = box.get("conn")
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        worker.join(timeout=30)
    if "result" in box:
        return outcome, message, box["result"]
    aborted = box.get("aborted")
    if aborted is not None and aborted.timed_out or outcome == "timeout":
        return "timeout", message, error_result(
            task_id, f"the check was still running after {int(cell_timeout)} s (an infinite "
            "loop, or code far too slow?); interrupted")
    if outcome == "died":
        return outcome, message, error_result(task_id, f"the check crashed the kernel: {message}")
    reason = str(aborted) if aborted is not None else (message or "no result")
    return outcome, message, error_result(task_id, f"the grader could not run this check: {reason}")


def _grade_tasks(kernel: _Kernel, task_ids: Sequence[str], done: list[int], cell_timeout: float,
                 hidden_seed: int | None, deadline: float, report: NotebookReport) -> None:
    """Grade each task from this process against the kernel, one serve cell per task. Grading
    gets its own time (a cell timeout per task), beyond the notebook's budget."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(kernel.workdir / "grader.sock"))
    listener.listen(1)
    try:
        for offset, task_id in enumerate(task_ids):
            outcome, _, result = _grade_one(kernel, listener, task_id, cell_timeout, hidden_seed)
            report.results.append(result)
            if outcome not in ("timeout", "died"):
                continue
            try:
                _recover(kernel, outcome, done, cell_timeout,
                         max(deadline, time.monotonic() + cell_timeout), report)
            except _GiveUp:
                for rest in task_ids[offset + 1:]:
                    report.results.append(error_result(rest, "not graded: the kernel kept failing"))
                return
    finally:
        listener.close()


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


def become_subreaper() -> bool:
    """Make orphaned descendants (a daemon that double-forked) this process's children, so
    :func:`kill_descendants` reaches them. Linux only; False elsewhere."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def make_undumpable() -> None:
    """Make this process's /proc entries (environment, file descriptors, memory) unreadable to
    other processes of the same user: without a sandbox, a kernel of the same user could
    otherwise write into the report pipe. No effect on root, which may read anything."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


def kill_descendants() -> int:
    """Kill every process below this one (repeatedly, so forks in flight are caught too)."""
    import psutil

    killed = 0
    for _ in range(5):
        children = psutil.Process().children(recursive=True)
        if not children:
            break
        for proc in children:
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=2)
    return killed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run and grade one notebook (used by "
                                     "`course-lib grade`; one process per notebook). Reads "
                                     '{"hidden_seed": ..., "token": ...} as JSON on stdin and '
                                     "writes JSON lines tagged with the token on stdout.")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--tasks", nargs="+", required=True, help="task ids, e.g. 01.pack_int4")
    parser.add_argument("--cell-timeout", type=float, default=120)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--memory-gb", type=float, default=0, help="memory cap, 0 = none")
    parser.add_argument("--hide", type=Path, nargs="*", default=[],
                        help="folders the kernel must not see")
    parser.add_argument("--no-sandbox", action="store_true", help="run the kernel unsandboxed")
    args = parser.parse_args(argv)
    secrets = json.loads(sys.stdin.readline() or "{}")
    token = str(secrets.get("token", ""))
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything else printed here (a check's line) goes to the log, not the report

    def stream(item: dict) -> None:
        out.write(json.dumps({"token": token, **item}) + "\n")
        out.flush()

    become_subreaper()
    make_undumpable()
    try:
        # the sandbox caps the kernel's whole tree; without one this per-process cap is all
        from course_lib.grading import sandbox as sb

        if sb.choose(not args.no_sandbox).kind == "none":
            limit_memory(args.memory_gb)
        report = run_notebook(args.notebook, args.tasks, args.cell_timeout, args.timeout,
                              secrets.get("hidden_seed"), args.hide, args.memory_gb, stream,
                              not args.no_sandbox)
    finally:
        kill_descendants()
    stream({"report": report.to_json()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
