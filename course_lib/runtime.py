"""Where and how the course runs: device, Triton mode, seeding, fast mode, offline mode.

Everything that depends on the machine is decided here, once, so notebooks and library code
never move tensors to a GPU by hand or test for one themselves.

Environment variables:

- ``COURSE_DEVICE``: force a device ("cpu", "cuda", "cuda:1", "mps").
- ``COURSE_MODE``: how big the notebooks run (:func:`course_mode`): ``fast`` (CI: smallest
  shapes, the bundled tiny models), ``cpu`` (the default without CUDA: sizes that finish a
  notebook in minutes on a laptop, real models) or ``full`` (the default with CUDA).
- ``COURSE_FAST=1``: the older switch, an alias for ``COURSE_MODE=fast``.
- ``COURSE_OFFLINE=1``: never try the model or dataset hub (also ``HF_HUB_OFFLINE=1``).
- ``COURSE_THREADS``: torch threads on a CPU, overriding the course's rule (:func:`cpu_threads`).
- ``TRITON_INTERPRET``: set to 1 by :func:`triton_mode` when there is no CUDA, before the
  course's kernels are defined, so they run on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import re
import sys
import urllib.request
from functools import lru_cache
from pathlib import Path

import torch

TRITON_MODES = ("native", "interpret", "torch", "compile")
COURSE_MODES = ("fast", "cpu", "full")
HUB_URL = "https://huggingface.co"

_TRUE = {"1", "true", "yes", "on"}
_logged: set[str] = set()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def course_mode() -> str:
    """The run mode: ``COURSE_MODE`` if set, else ``fast`` when ``COURSE_FAST=1``, else ``full``
    with a CUDA GPU and ``cpu`` without one."""
    requested = os.environ.get("COURSE_MODE", "").strip().lower()
    if requested:
        if requested not in COURSE_MODES:
            raise ValueError(f"COURSE_MODE={requested!r} is not a mode; use one of "
                             f"{', '.join(COURSE_MODES)}")
        return requested
    if _env_flag("COURSE_FAST"):
        return "fast"
    return "full" if has_cuda() else "cpu"


def by_mode(fast, cpu, full):
    """The value for the current :func:`course_mode`: a notebook's sizes in one line,
    e.g. ``n_windows = by_mode(fast=2, cpu=20, full=None)``."""
    return {"fast": fast, "cpu": cpu, "full": full}[course_mode()]


def is_fast() -> bool:
    """True in fast mode (``COURSE_MODE=fast`` or ``COURSE_FAST=1``): small shapes, tiny models,
    short loops."""
    return course_mode() == "fast"


def describe_mode() -> str:
    """One line for the top of a notebook: the mode, why it was chosen, and the device."""
    mode = course_mode()
    why = ("COURSE_MODE" if os.environ.get("COURSE_MODE", "").strip()
           else "COURSE_FAST=1" if _env_flag("COURSE_FAST")
           else "default with a CUDA GPU" if mode == "full" else "default without a CUDA GPU")
    sizes = {"fast": "smallest sizes, SmolLM2-135M and the bundled tiny models (CI)",
             "cpu": "laptop sizes, real models",
             "full": "full sizes, real models"}[mode]
    return f"course mode: {mode} ({why}): {sizes}; device {get_device()}"


def is_offline() -> bool:
    """True when the hub must not be tried (``COURSE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return _env_flag("COURSE_OFFLINE") or _env_flag("HF_HUB_OFFLINE")


def get_device() -> torch.device:
    """The device the course computes on: ``COURSE_DEVICE`` if set, else CUDA if present, else CPU."""
    requested = os.environ.get("COURSE_DEVICE", "").strip()
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise ValueError(
                f"COURSE_DEVICE={requested!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
            ) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"COURSE_DEVICE={requested!r} but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_cuda() -> bool:
    """True when the chosen device is a CUDA GPU."""
    return get_device().type == "cuda"


#: Set to 1 in :mod:`course_lib.kernels.aot`'s worker: kernels are compiled, never run.
COMPILE_ONLY_ENV = "COURSE_TRITON_COMPILE"


@lru_cache(maxsize=1)
def triton_mode() -> str:
    """How Triton kernels run here: "native" (CUDA), "interpret" (CPU interpreter) or "torch".

    A fourth mode, "compile", is chosen only by ``COURSE_TRITON_COMPILE=1`` (set by
    :mod:`course_lib.kernels.aot` in its own worker process): the kernels are decorated for
    Triton's real compiler, with or without a GPU, and launches are captured and compiled ahead
    of time for NVIDIA targets instead of being run.

    "torch" means Triton is not installed (e.g. macOS or Windows): every kernel has a torch
    reference twin and the launchers call it instead. In "interpret" mode this function sets
    ``TRITON_INTERPRET=1``. Triton reads that variable when a function is decorated with
    ``@triton.jit``: our kernels, and Triton's own helpers (``tl.sum``, ``tl.zeros``...), which
    are decorated when Triton is imported. ``import course_lib`` therefore calls this function
    first thing; when Triton was imported earlier anyway (transformers imports it),
    :mod:`course_lib.kernels` re-wraps those helpers for the interpreter.
    """
    if importlib.util.find_spec("triton") is None:
        return "torch"
    if _env_flag(COMPILE_ONLY_ENV):
        os.environ.pop("TRITON_INTERPRET", None)
        return "compile"
    if has_cuda():
        return "interpret" if _env_flag("TRITON_INTERPRET") else "native"
    os.environ["TRITON_INTERPRET"] = "1"
    return "interpret"


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub (models and datasets) answers within ``timeout`` seconds
    and offline mode is off. Probed once per process."""
    if is_offline():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout)
        return True
    except Exception:
        return False


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy (when present) and torch; return a torch Generator with that seed."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def log_once(message: str) -> None:
    """Print ``message`` to stderr the first time it is seen in this process."""
    if message not in _logged:
        _logged.add(message)
        print(message, file=sys.stderr)


THREADS_ENV = "COURSE_THREADS"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads(requested: int | None = None, *, shared: bool = False) -> int:
    """How many torch threads the course uses on a CPU: its one rule for the engine's server,
    the benchmarks and the notebooks' timing cells.

    1. ``requested`` (a ``--threads`` flag), else ``$COURSE_THREADS``, else ``$OMP_NUM_THREADS``
       (torch already obeys it), wins.
    2. Otherwise the cores this process may use, at most torch's own default (physical cores),
    3. minus one when ``shared``: something else needs a core at the same time (a server's event
       loop and tokenizer beside the engine, a load generator beside the server, timings taken
       while Jupyter runs). On 2 cores, two torch threads thrash as soon as anything else runs:
       every parallel region waits for the thread that was descheduled.
    4. One when the machine is already busy (1-minute load average above the usable cores).

    Never below 1.
    """
    if requested is None:
        for name in (THREADS_ENV, "OMP_NUM_THREADS"):
            text = os.environ.get(name, "").strip()
            if text:
                if not text.isdigit() or int(text) < 1:
                    raise ValueError(f"{name}={text!r} must be a positive integer (torch threads)")
                requested = int(text)
                break
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested!r}")
        return requested
    cores = _usable_cores()
    threads = min(cores, _default_torch_threads()) - (1 if shared else 0)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores:
        threads = 1
    return max(1, threads)


@lru_cache(maxsize=1)
def _default_torch_threads() -> int:
    return torch.get_num_threads()  # read before the course changes it


_default_torch_threads()


def use_cpu_threads(requested: int | None = None, *, shared: bool = False,
                    device: torch.device | str | None = None) -> int:
    """Set torch's threads by :func:`cpu_threads` when computing on a CPU (``device``, default
    :func:`get_device`; a GPU run leaves them alone) and return the number in use; says what it
    chose, once."""
    if torch.device(device or get_device()).type != "cpu":
        return torch.get_num_threads()
    threads = cpu_threads(requested, shared=shared)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log_once(f"torch uses {threads} CPU thread(s) ({_usable_cores()} usable cores"
             f"{', one left for other work' if shared else ''}; set {THREADS_ENV} to override)")
    return threads


def machine_description() -> str:
    """CPU (or GPU) model and core count, e.g. 'AMD EPYC 7B13 (x86_64), 2 cores'; names the
    machine a measured figure came from."""
    if has_cuda():
        return f"{torch.cuda.get_device_name(get_device())}, {os.cpu_count()} CPU cores"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({platform.machine()}), {os.cpu_count()} cores"


def machine_slug() -> str:
    """A file-name-safe short form of :func:`machine_description`, for benchmark result files."""
    return re.sub(r"[^a-z0-9]+", "-", machine_description().lower()).strip("-")[:60]


def write_result(name: str, result: dict, results_dir: Path, out: Path | None = None) -> Path:
    """Write a benchmark's result as JSON to ``out``, by default
    ``results_dir/<name>-<machine slug>.json`` (so runs on different machines sit side by side)."""
    out = Path(out) if out is not None else Path(results_dir) / f"{name}-{machine_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def summary() -> dict[str, str]:
    """A short description of the runtime, used by ``course-lib doctor`` and notebook 00."""
    device = get_device()
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
        "triton_mode": triton_mode(),
        "mode": course_mode(),
        "offline_mode": str(is_offline()),
        "threads": str(torch.get_num_threads()),
        "machine": machine_description(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
