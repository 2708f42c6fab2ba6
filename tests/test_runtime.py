"""Device choice, Triton mode, seeding and the doctor command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from course_lib import runtime


def test_device_override(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "banana")
    with pytest.raises(ValueError, match="COURSE_DEVICE='banana' is not a device"):
        runtime.get_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_request_without_cuda(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.get_device()


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_fast_flag(monkeypatch, value, expected):
    monkeypatch.delenv("COURSE_MODE", raising=False)
    monkeypatch.setenv("COURSE_FAST", value)
    assert runtime.is_fast() is expected


@pytest.mark.parametrize("fast, mode, cuda, expected", [
    ("", "", False, "cpu"),          # the default without CUDA
    ("", "", True, "full"),          # the default with CUDA
    ("1", "", True, "fast"),         # COURSE_FAST=1 is an alias for fast, even on a GPU
    ("1", "full", False, "full"),    # COURSE_MODE decides first
    ("", "CPU", True, "cpu"),        # case-insensitive
])
def test_course_mode(monkeypatch, fast, mode, cuda, expected):
    monkeypatch.setenv("COURSE_FAST", fast)
    monkeypatch.setenv("COURSE_MODE", mode)
    monkeypatch.setattr(runtime, "has_cuda", lambda: cuda)
    assert runtime.course_mode() == expected
    assert runtime.is_fast() is (expected == "fast")
    assert runtime.by_mode(fast="f", cpu="c", full="F") == {"fast": "f", "cpu": "c", "full": "F"}[expected]
    assert runtime.describe_mode().startswith(f"course mode: {expected} (")


def test_course_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv("COURSE_MODE", "turbo")
    with pytest.raises(ValueError, match=r"COURSE_MODE='turbo' is not a mode; use one of fast, cpu, full"):
        runtime.course_mode()


def _python(code: str, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_triton_interpreter_is_set_before_import():
    pytest.importorskip("triton")
    out = _python("import os; from course_lib import runtime; m = runtime.triton_mode(); "
                  "import triton; print(m, os.environ.get('TRITON_INTERPRET'))", COURSE_DEVICE="cpu")
    assert out == "interpret 1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_interpreter_works_when_triton_was_imported_first():
    """transformers imports triton early; kernels defined afterwards must still interpret."""
    pytest.importorskip("triton")
    out = _python("import triton, triton.language as tl, torch; from course_lib import runtime; "
                  "m = runtime.triton_mode()\n"
                  "@triton.jit\ndef k(p):\n    tl.store(p, tl.load(p) + 1)\n"
                  "x = torch.zeros(1); k[(1,)](x); print(m, x.item())", COURSE_DEVICE="cpu")
    assert out == "interpret 1.0"


def test_torch_fallback_without_triton(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    runtime.triton_mode.cache_clear()
    try:
        assert runtime.triton_mode() == "torch"
    finally:
        runtime.triton_mode.cache_clear()


def test_seed_everything_is_repeatable():
    runtime.seed_everything(7)
    a = torch.rand(3)
    runtime.seed_everything(7)
    assert torch.equal(a, torch.rand(3))


def test_doctor_offline_reports_tiny_pair():
    env = {k: v for k, v in os.environ.items()} | {"COURSE_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "course_lib", "doctor"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "triton_mode" in res.stdout and "torch" in res.stdout
    assert "in use: tiny" in res.stdout and "pair tiny / tiny-draft" in res.stdout
    assert "gpt2" in res.stdout and "offline mode" in res.stdout


def test_write_result_names_the_file_after_the_machine(tmp_path):
    result = {"benchmark": "x", "value": 1.5}
    out = runtime.write_result("x", result, tmp_path / "results")
    assert out == tmp_path / "results" / f"x-{runtime.machine_slug()}.json"
    assert json.loads(out.read_text()) == result
    chosen = runtime.write_result("x", result, tmp_path / "results", tmp_path / "deep" / "mine.json")
    assert chosen == tmp_path / "deep" / "mine.json" and json.loads(chosen.read_text()) == result


@pytest.fixture
def machine(monkeypatch):
    """A fake machine for the threads rule: set its usable cores, torch's default and load."""
    for name in (runtime.THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def set_machine(cores: int, torch_default: int, load: float = 0.0) -> None:
        monkeypatch.setattr(runtime, "_usable_cores", lambda: cores)
        monkeypatch.setattr(runtime, "_default_torch_threads", lambda: torch_default)
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))

    return set_machine


@pytest.mark.parametrize("cores, torch_default, load, shared, want", [
    (2, 2, 0.0, False, 2),   # idle 2-core CPU, alone: both cores
    (2, 2, 0.0, True, 1),    # beside a load generator / Jupyter: one core left for it
    (16, 8, 0.0, True, 7),   # physical cores cap it (torch's default), then one left
    (8, 8, 0.5, False, 8),
    (8, 8, 9.0, False, 1),   # already busy: threads would wait for each other
    (1, 1, 0.0, True, 1),    # never below one
])
def test_cpu_threads_rule(machine, cores, torch_default, load, shared, want):
    machine(cores, torch_default, load)
    assert runtime.cpu_threads(shared=shared) == want


def test_cpu_threads_overrides_and_bad_values(machine, monkeypatch):
    machine(16, 8)
    assert runtime.cpu_threads(3, shared=True) == 3  # --threads wins, exactly
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert runtime.cpu_threads(shared=True) == 5
    monkeypatch.setenv(runtime.THREADS_ENV, "2")  # the course's variable beats OMP's
    assert runtime.cpu_threads() == 2
    monkeypatch.setenv(runtime.THREADS_ENV, "two")
    with pytest.raises(ValueError, match="COURSE_THREADS='two' must be a positive integer"):
        runtime.cpu_threads()
    monkeypatch.delenv(runtime.THREADS_ENV)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            runtime.cpu_threads(bad)


def test_use_cpu_threads_sets_torch_on_a_cpu_only(machine, monkeypatch):
    machine(2, 2)
    before = torch.get_num_threads()
    try:
        assert runtime.use_cpu_threads(shared=True, device="cpu") == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        assert runtime.use_cpu_threads(shared=True, device="cuda") == 2  # a GPU run: untouched
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
