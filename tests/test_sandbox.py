"""The grader's per-notebook sandbox: each test runs a small ``python -c`` program inside it and
checks one thing a malicious notebook must not be able to do (or must be able to do)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from course_lib.grading import sandbox
from course_lib.grading.sandbox import CAP_EXIT_CODE, KILLED_PREFIX, SandboxPolicy

SANDBOX = sandbox.detect()
CGROUPS = "cgroup" in SANDBOX.summary  # the probe's caps went to a cgroup here
REPO = Path(sandbox.__file__).resolve().parents[2]


def _command(code: str, policy: SandboxPolicy, *args: str, cgroups: bool = True) -> list[str]:
    """The sandboxed ``python -c code args`` (the watchdog instead of cgroups if asked)."""
    argv = [sys.executable, "-c", code, *args]
    if SANDBOX.kind == "namespaces":
        return [*sandbox.launcher_command(policy, cgroups=cgroups), "--", *argv]
    return SANDBOX.wrap(argv, policy)


def _run(code: str, policy: SandboxPolicy, *args: str, timeout: float = 20, **kw):
    """Run ``code`` sandboxed; its CompletedProcess (text output)."""
    cmd = _command(code, policy, *args, cgroups=kw.pop("cgroups", True))
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=policy.scratch, **kw
    )


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _host_pids_with(token: str) -> list[int]:
    """Host processes whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _wait_gone(token: str, seconds: float = 3.0) -> list[int]:
    """Poll until no host process carries ``token``; those still there at the end."""
    deadline = time.monotonic() + seconds
    while (left := _host_pids_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """An empty scratch folder; skips the test where there is no sandbox to run it in."""
    if SANDBOX.kind == "none":
        pytest.skip(SANDBOX.summary)
    folder = tmp_path / "scratch"
    folder.mkdir()
    return folder


def test_no_network(scratch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3); print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('BLOCKED', e)\n"
    )
    with server:
        proc = _run(code, SandboxPolicy(scratch))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("BLOCKED"), proc.stdout


def test_unix_socket_in_scratch_is_reachable_from_outside(scratch):
    path = scratch / "kernel.sock"
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "c, _ = s.accept(); c.sendall(b'hello from inside'); c.close()\n"
    )
    proc = subprocess.Popen(_command(code, SandboxPolicy(scratch), str(path)), cwd=scratch)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no socket appeared"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            assert client.recv(100) == b"hello from inside"
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_proc_shows_only_the_sandbox(scratch):
    secret = f"SECRET-{uuid.uuid4()}"
    env = {**os.environ, "COURSE_TEST_SECRET": secret}
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    code = (
        "import json, os, sys\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "seen = b''\n"
        "for p in pids:\n"
        "    for f in ('environ', 'cmdline'):\n"
        "        try: seen += open(f'/proc/{p}/{f}', 'rb').read()\n"
        "        except OSError: pass\n"
        "secret = sys.argv[1][::-1].encode()  # never in any command line as such\n"
        "print(json.dumps({'pids': pids, 'secret': secret in seen,\n"
        "                  'host': os.path.exists(f'/proc/{sys.argv[2]}/environ')}))\n"
    )
    try:
        clean_env = {k: v for k, v in os.environ.items() if k != "COURSE_TEST_SECRET"}
        proc = _run(code, SandboxPolicy(scratch), secret[::-1], str(host.pid), env=clean_env)
        out = _json_out(proc)
    finally:
        host.kill()
        host.wait()
    assert not out["secret"], "a host process's environ is readable inside"
    assert len(out["pids"]) <= 3, out["pids"]  # init, the command (and maybe its reader)
    assert host.pid < 1000 or not out["host"]


WRITES = """
import json, os, sys
scratch, repo, secret_file, home_file = sys.argv[1:5]
def can_write(path):
    try:
        with open(path, 'w') as f: f.write('x')
        return True
    except OSError:
        return False
print(json.dumps({
    'scratch': can_write(os.path.join(scratch, 'out.txt')),
    'repo': can_write(os.path.join(repo, 'course_lib', 'sandbox_probe.txt')),
    'venv': can_write(os.path.join(sys.prefix, 'sandbox_probe.txt')),
    'home': os.listdir(os.path.expanduser('~')),
    'host_home_file': os.path.exists(home_file),
    'home_writable': can_write(os.path.expanduser('~/x')),
    'tmp_writable': can_write('/tmp/x'),
    'host_tmp_file': os.path.exists(secret_file),
    'cwd': os.getcwd(),
    'relative': can_write('relative.txt'),
    'dev': os.listdir('/dev'),
}))
"""


def test_writes_only_scratch_and_private_tmp(scratch, tmp_path):
    host_file = Path("/tmp") / f"course-sandbox-test-{uuid.uuid4()}"
    home = Path.home()
    home_file = home / f"course-sandbox-test-{uuid.uuid4()}"
    probes = [REPO / "course_lib" / "sandbox_probe.txt", Path(sys.prefix) / "sandbox_probe.txt"]
    for path in (host_file, home_file):
        path.write_text("not for the learner")
    try:
        proc = _run(
            WRITES, SandboxPolicy(scratch), str(scratch), str(REPO), str(host_file), str(home_file)
        )
        out = _json_out(proc)
    finally:
        host_file.unlink()
        home_file.unlink()
        written = [p for p in probes if p.exists()]
        for path in written:  # only a broken sandbox writes them: fail, but leave no trace
            path.unlink()
    # HOME is empty but for the folders Python needs (bound back read-only, e.g. ~/.pyenv)
    kept = {
        Path(k).relative_to(home).parts[0]
        for k in sandbox.keep_paths([sys.executable])
        if Path(k).is_relative_to(home) and Path(k) != home
    }
    assert out["scratch"] and out["relative"] and out["cwd"] == str(scratch)
    assert (scratch / "out.txt").read_text() == "x"
    assert not out["repo"] and not out["venv"]
    assert set(out["home"]) <= kept | {"x"}
    assert out["home_writable"] and out["tmp_writable"]
    assert not out["host_tmp_file"] and not out["host_home_file"]
    # /dev holds only harmless devices and GPUs, no disks (readable by root otherwise)
    assert {"null", "zero", "urandom", "shm"} <= set(out["dev"])
    assert set(out["dev"]) <= set(sandbox._DEVICES) | {
        "fd",
        "stdin",
        "stdout",
        "stderr",
        "ptmx",
        "shm",
        "pts",
    } | {name for name in out["dev"] if name.startswith(sandbox._DEVICE_PREFIXES)}
    assert written == []
    assert not Path("/tmp/x").exists() or Path("/tmp/x").read_text() != "x"


def test_hidden_folder_looks_empty(scratch, tmp_path):
    # the library's own folder: visible inside wherever the checkout is (bound back read-only
    # when it lies under /tmp or HOME), so only the hidden tmpfs can hide it
    hidden = Path(sandbox.__file__).resolve().parent
    code = (
        "import json, os, sys\n"
        "try: open(os.path.join(sys.argv[1], 'x'), 'w'); w = True\n"
        "except OSError: w = False\n"
        "print(json.dumps({'list': os.listdir(sys.argv[1]), 'writable': w}))\n"
    )
    out = _json_out(_run(code, SandboxPolicy(scratch, hidden=(hidden,)), str(hidden)))
    assert out == {"list": [], "writable": False}


UNDO_MOUNTS = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2
def remount_rw(path):
    return libc.mount(None, path.encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None) == 0
def umount(path):
    return libc.umount2(path.encode(), MNT_DETACH) == 0
result = {'remount': remount_rw('/'), 'umount_tmp': umount('/tmp'),
          'umount_proc': umount('/proc')}
# From a fresh user + mount namespace (where we would have every capability):
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000 | 0x00020000) == 0:
    for name, text in (('setgroups', 'deny'), ('uid_map', f'0 {uid} 1'),
                       ('gid_map', f'0 {gid} 1')):
        with open(f'/proc/self/{name}', 'w') as f: f.write(text)
    result.update(nested_remount=remount_rw('/'), nested_umount_tmp=umount('/tmp'))
try:
    open(os.path.join(os.environ['REPO'], 'course_lib', 'sandbox_probe.txt'), 'w')
    result['write'] = True
except OSError:
    result['write'] = False
print(json.dumps(result))
"""


def test_mounts_cannot_be_undone(scratch):
    try:
        proc = _run(UNDO_MOUNTS, SandboxPolicy(scratch), env={**os.environ, "REPO": str(REPO)})
    finally:
        (REPO / "course_lib" / "sandbox_probe.txt").unlink(missing_ok=True)
    out = _json_out(proc)
    assert not any(out.values()), out


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[1]])
    os._exit(0)
os.wait()
print('started', flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_daemon_dies_when_the_command_exits(scratch):
    token = f"daemon-{uuid.uuid4()}"
    proc = _run(DAEMON, SandboxPolicy(scratch), token, "0.5")
    assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr
    assert _wait_gone(token) == []


def test_everything_dies_when_the_launcher_is_killed(scratch):
    token = f"daemon-{uuid.uuid4()}"
    proc = subprocess.Popen(
        _command(DAEMON, SandboxPolicy(scratch), token, "60"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=scratch,
    )
    try:
        assert proc.stdout.readline().strip() == "started"
        assert _host_pids_with(token), "the daemon did not start"
        proc.kill()
        proc.wait()
        assert _wait_gone(token) == []
    finally:
        proc.kill()
        proc.stdout.close()


def test_sigint_reaches_the_command_once(scratch):
    code = (
        "import signal, sys, time\n"
        "hits = []\n"
        "signal.signal(signal.SIGINT, lambda *a: hits.append(1))\n"
        "print('ready', flush=True)\n"
        "end = time.monotonic() + 1.5\n"
        "while time.monotonic() < end: time.sleep(0.05)\n"
        "print(len(hits))\n"
    )
    proc = subprocess.Popen(
        _command(code, SandboxPolicy(scratch)),
        stdout=subprocess.PIPE,
        text=True,
        cwd=scratch,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGINT)  # as jupyter_client interrupts a kernel
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and out.strip() == "1"


MEMORY_HOG = """
import subprocess, sys, time
hog = 'import time; x = b"1" * {n}; print("alloc", flush=True); time.sleep(30)'
procs = [subprocess.Popen([sys.executable, '-c', hog.format(n=int(sys.argv[1]))])
         for _ in range(2)]
time.sleep(30)
"""


def _mechanism_check(cgroups: bool, stderr: str) -> None:
    """The cap was enforced by the mechanism the test asked for."""
    assert ("(watchdog)" in stderr) != cgroups, stderr


CAP_MECHANISMS = pytest.mark.parametrize(
    "cgroups",
    [pytest.param(True, marks=pytest.mark.skipif(not CGROUPS, reason="no cgroup here")), False],
    ids=["cgroup", "watchdog"],
)


@CAP_MECHANISMS
def test_memory_cap_holds_for_the_tree(scratch, cgroups):
    cap = 400 * 10**6
    start = time.monotonic()
    proc = _run(
        MEMORY_HOG, SandboxPolicy(scratch, memory_bytes=cap), str(250 * 10**6), cgroups=cgroups
    )
    assert proc.returncode == CAP_EXIT_CODE, (proc.returncode, proc.stderr)
    assert f"{KILLED_PREFIX} memory" in proc.stderr
    _mechanism_check(cgroups, proc.stderr)
    assert proc.stdout.count("alloc") <= 2 and time.monotonic() - start < 15


FORK_LOOP = """
import os, sys, time
started = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        started += 1
    except OSError:
        pass
print('started', started, flush=True)
time.sleep(30)
"""


@CAP_MECHANISMS
def test_process_cap_stops_a_fork_loop(scratch, cgroups):
    token = f"forks-{uuid.uuid4()}"
    proc = _run(FORK_LOOP, SandboxPolicy(scratch, max_processes=20), token, cgroups=cgroups)
    assert proc.returncode == CAP_EXIT_CODE, (proc.returncode, proc.stderr)
    assert f"{KILLED_PREFIX} processes" in proc.stderr
    _mechanism_check(cgroups, proc.stderr)
    started = [int(w) for w in proc.stdout.split()[1:2]]
    if cgroups:
        assert all(n < 20 for n in started), proc.stdout
    elif os.geteuid() != 0:  # the kernel exempts global root from RLIMIT_NPROC
        assert all(n < 20 + sandbox.NPROC_MARGIN for n in started), proc.stdout
    assert _wait_gone(token) == []


def test_detect_finds_namespaces_where_util_linux_unshare_works():
    """A broken launcher must not hide behind "none" (which would skip every test here)."""
    if shutil.which("unshare") is None:
        pytest.skip("no util-linux unshare to compare with")
    probe = subprocess.run(
        ["unshare", "-Urnmp", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10
    )
    if probe.returncode != 0:
        pytest.skip("unshare -Urnmp fails here too")
    assert SANDBOX.kind == "namespaces", SANDBOX.summary


def test_detect_is_cached_and_never_raises(monkeypatch):
    assert sandbox.detect() is sandbox.detect()
    assert SANDBOX.summary and "\n" not in SANDBOX.summary
    try:
        sandbox.detect.cache_clear()
        monkeypatch.setattr(sandbox, "_probe_namespaces", lambda policy: 1 / 0)
        broken = sandbox.detect()
        assert broken.kind == "none" and "ZeroDivisionError" in broken.summary
        sandbox.detect.cache_clear()
        monkeypatch.undo()
        monkeypatch.setattr(
            sandbox,
            "launcher_command",
            lambda *a, **k: [
                sys.executable,
                "-c",
                "import sys; sys.exit('unshare: Operation not permitted')",
            ],
        )
        monkeypatch.setattr(sandbox, "_bwrap_works", lambda policy: False)
        refused = sandbox.detect()
        assert refused.kind == "none" and "Operation not permitted" in refused.summary
        assert refused.wrap(["true"], SandboxPolicy(Path("/tmp"))) == ["true"]
        sandbox.detect.cache_clear()
        monkeypatch.setattr(sys, "platform", "darwin")
        assert sandbox.detect().kind == "none"
    finally:
        sandbox.detect.cache_clear()
