"""``make gpu-check``: the one script for a lent GPU. It refuses at once without CUDA, runs every
step under its own limit within 10 minutes, and reports each step's outcome."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA refusal")
def test_without_cuda_it_stops_at_once_with_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "Nothing was run" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing run, nothing written


def test_the_plan_is_gpu_tests_bench_gpu_and_both_lessons_at_full_size_within_10_minutes(tmp_path):
    gpu_check = _module()
    plan = gpu_check.steps(tmp_path, "machine")
    commands = [" ".join(cmd) for _, cmd, _, _ in plan]
    assert any("-m gpu tests" in c for c in commands)
    assert any("run_all.py --gpu --require-cuda" in c for c in commands)
    for lesson in ("02_post_training_quantization.ipynb", "06_paged_attention.ipynb"):
        (env,) = [env for _, cmd, env, _ in plan if cmd[-1].endswith(lesson)]
        assert env["COURSE_MODE"] == "full"
        assert (ROOT / "notebooks" / lesson).exists()
    assert sum(limit for *_, limit in plan) <= 600


def test_makefile_target_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\ngpu-check:", 1)[1].split("\n\n", 1)[0]
    assert "benchmarks/gpu_check.py" in target


def test_each_step_is_reported_and_a_failed_or_overlong_step_fails_the_check(tmp_path, monkeypatch):
    gpu_check = _module()
    py = sys.executable
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: "a pretend GPU")
    monkeypatch.setattr(gpu_check, "steps", lambda results, slug: [
        ("passes", [py, "-c", "print('fine')"], {}, 30),
        ("fails", [py, "-c", "import sys; print('broken'); sys.exit(3)"], {}, 30),
        ("too slow", [py, "-c", "import time; time.sleep(30)"], {}, 2)])
    assert gpu_check.main(["--results", str(tmp_path)]) == 1
    (report,) = tmp_path.glob("gpu_check-*.json")
    rows = {row["step"]: row for row in json.loads(report.read_text())["steps"]}
    assert rows["passes"]["returncode"] == 0 and "fine" in rows["passes"]["output_tail"]
    assert rows["fails"]["returncode"] == 3 and "broken" in rows["fails"]["output_tail"]
    assert rows["too slow"]["returncode"] == 124 and rows["too slow"]["seconds"] < 20
    assert json.loads(report.read_text())["device"] == "a pretend GPU"
