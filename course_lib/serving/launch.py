"""Start ``course-lib serve`` in the background and stop it cleanly (notebooks, benchmarks, tests).

:class:`ServerProcess` runs the real command in a child process on a free loopback port, waits
for ``/health`` to say 200, and on :meth:`stop` (or leaving the ``with`` block, or the Python
process exiting) sends SIGTERM, so the server drains as it would in a pod, then kills it if it
does not exit in time. No server is ever left behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m course_lib serve ARGS`` on 127.0.0.1; ``url`` is its base URL (no ``/v1``)."""

    def __init__(self, *args: str, port: int | None = None, threads: int | None = None,
                 startup_timeout: float = 120.0, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.threads, self.startup_timeout = threads, startup_timeout
        self.env = {**os.environ, **(env or {})}
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="course-serve-", suffix=".log", delete=False)

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "course_lib", "serve", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        atexit.register(self.kill)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"the server was not healthy within {self.startup_timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return "".join(f.readlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
