"""A per-notebook sandbox for the grader's Jupyter kernels: Linux namespaces, no root, no Docker.

:func:`detect` finds what this machine allows, once per process; :meth:`Sandbox.wrap` turns a
command (the kernel: ``python -m ipykernel_launcher -f CONN``) into one that runs it sandboxed.
The wrapped command runs this file as a launcher::

    python -I .../sandbox.py --policy '{"scratch": "/tmp/x", ...}' -- CMD ARGS

(``python -m course_lib.grading.sandbox`` works too; ``wrap`` runs the file with ``-I`` so that a
file the learner left in the kernel's working folder can never shadow the launcher.)

The launcher is a chain of four processes, each dying with its parent (``PR_SET_PDEATHSIG``):

* **launcher** (host namespaces): puts the tree in a cgroup when one can be made, polls its
  counters, forwards SIGINT/SIGTERM, exits with the command's status;
* **child**: new user (root inside = you outside), mount, network and PID namespaces;
* **init** (PID 1 of the new PID namespace): mounts (below), brings loopback up, runs the
  watchdog for caps no cgroup enforces, reaps orphans, exits when the command exits, so the
  kernel kills everything left in the namespace (daemons included);
* **command**: a nested user namespace (no capability over the mounts, which are then locked),
  ``PR_SET_NO_NEW_PRIVS``, its own session, ``RLIMIT_AS``/``RLIMIT_NPROC``, then ``exec``.

Mounts, in order: every mount remounted read-only (keeping the locked nosuid/nodev/noexec/atime
flags), a fresh /proc, a minimal /dev (null, zero, urandom..., GPUs; no disks), empty private
tmpfs on /tmp, /var/tmp, /dev/shm and $HOME, the folders Python needs bound back read-only where
a tmpfs covered them (pyenv lives in $HOME), ``scratch`` bound back read-write at its own path,
each ``hidden`` folder covered by an empty read-only tmpfs.

A cap that is hit kills the whole tree; the launcher writes one line starting with
``course-sandbox: killed:`` to its stderr and exits with :data:`CAP_EXIT_CODE`.
The bubblewrap path (used only when namespaces fail and ``bwrap`` works) is untested here.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Exit status of the launcher when it killed the tree for a cap.
CAP_EXIT_CODE = 86
#: Prefix of the one stderr line saying why the tree was killed.
KILLED_PREFIX = "course-sandbox: killed:"
#: RLIMIT_NPROC is max_processes plus this (the kernel's count runs a few tasks off ours).
NPROC_MARGIN = 4
#: Seconds between two polls of the caps.
POLL_S = 0.1

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
#: Per-mount options that a user namespace may not change (the kernel locks them).
_LOCKED_OPTIONS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
_PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass(frozen=True)
class SandboxPolicy:
    """What one sandboxed command may touch and use."""

    scratch: Path  # the only writable folder; visible inside at the same path
    hidden: tuple[Path, ...] = ()  # folders that look empty inside
    memory_bytes: int | None = None  # cap for the whole process tree
    max_processes: int | None = None  # cap for the whole tree (tasks: threads count)
    readable: tuple[Path, ...] = ()  # folders visible read-only even under the private HOME

    def to_json(self) -> str:
        """The policy as the launcher's ``--policy`` argument."""
        return json.dumps(
            {
                "scratch": str(self.scratch),
                "hidden": [str(h) for h in self.hidden],
                "memory_bytes": self.memory_bytes,
                "max_processes": self.max_processes,
                "readable": [str(r) for r in self.readable],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SandboxPolicy:
        """The policy a ``--policy`` argument describes."""
        data = json.loads(text)
        return cls(
            scratch=Path(data["scratch"]),
            hidden=tuple(Path(h) for h in data.get("hidden", ())),
            memory_bytes=data.get("memory_bytes"),
            max_processes=data.get("max_processes"),
            readable=tuple(Path(r) for r in data.get("readable", ())),
        )


@dataclass(frozen=True)
class Sandbox:
    """How kernels are isolated on this machine: ``kind`` is "bubblewrap", "namespaces" or
    "none", ``summary`` one line for the grader's output."""

    kind: str
    summary: str

    def wrap(self, argv: list[str], policy: SandboxPolicy) -> list[str]:
        """The command that runs ``argv`` inside the sandbox (``argv`` itself for "none")."""
        if self.kind == "namespaces":
            return [*launcher_command(policy), "--", *argv]
        if self.kind == "bubblewrap":
            return _bwrap_command(argv, policy)
        return list(argv)


def launcher_command(policy: SandboxPolicy, probe: bool = False, cgroups: bool = True) -> list[str]:
    """``python -I sandbox.py --policy JSON`` (add ``--`` and the command); ``cgroups=False``
    leaves the caps to the watchdog (for tests)."""
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "--policy", policy.to_json()]
    return cmd + ["--probe"] * probe + ["--no-cgroup"] * (not cgroups)


# --------------------------------------------------------------------------- detection


@functools.cache
def detect() -> Sandbox:
    """Probe once per process what sandbox works here; never raises."""
    try:
        return _detect()
    except Exception as exc:  # noqa: BLE001 - detection must never break grading
        return Sandbox("none", f"no sandbox: the probe failed ({exc!r}); {_UNSAFE}")


_UNSAFE = "the kernel runs as you, with your files and network"


def choose(use_sandbox: bool = True) -> Sandbox:
    """The sandbox to grade in: :func:`detect`'s, or none when the instructor turned it off."""
    if not use_sandbox:
        return Sandbox("none", f"no sandbox: turned off (--no-sandbox); {_UNSAFE}")
    return detect()


def _detect() -> Sandbox:
    """Run the launcher on ``true``; fall back to bubblewrap, then to nothing."""
    if not sys.platform.startswith("linux"):
        return Sandbox("none", f"no sandbox: {sys.platform} has no Linux namespaces; {_UNSAFE}")
    with tempfile.TemporaryDirectory(prefix="course-sandbox-probe-") as scratch:
        policy = SandboxPolicy(Path(scratch), memory_bytes=1 << 34, max_processes=4096)
        ok, detail = _probe_namespaces(policy)
        if ok:
            return Sandbox("namespaces", _namespaces_summary(detail))
        if _bwrap_works(policy):
            return Sandbox(
                "bubblewrap",
                "sandbox: bubblewrap (no network, own PIDs, read-only files, private /tmp and "
                "HOME; per-process RLIMIT_AS and per-sandbox RLIMIT_NPROC only, no tree memory "
                "cap; untested path)",
            )
        return Sandbox("none", f"no sandbox: {detail}; {_UNSAFE}")


def _probe_namespaces(policy: SandboxPolicy) -> tuple[bool, dict | str]:
    """Run ``true`` in the launcher; (True, its probe report) or (False, why not)."""
    try:
        proc = subprocess.run(
            [*launcher_command(policy, probe=True), "--", "true"],
            capture_output=True,
            text=True,
            timeout=20,
            env=dict(os.environ),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"the namespace probe did not run ({exc})"
    for line in proc.stdout.splitlines():
        if line.startswith("course-sandbox-probe: ") and proc.returncode == 0:
            return True, json.loads(line.split(": ", 1)[1])
    err = proc.stderr.strip().splitlines()
    return False, (err[-1] if err else f"the namespace probe exited {proc.returncode}")


def _namespaces_summary(report: dict) -> str:
    """One line: what is isolated, how caps are enforced, which mounts stay writable."""
    text = (
        "sandbox: namespaces (no network, own PIDs, read-only files, private /tmp and HOME, "
        f"minimal /dev, locked mounts); caps: memory by {report['memory']}, processes by {report['processes']}"
    )
    if report["not_read_only"]:
        text += "; read-only not enforced on " + ", ".join(report["not_read_only"])
    return text


def _bwrap_works(policy: SandboxPolicy) -> bool:
    """Whether ``bwrap`` is on PATH and runs ``true`` with our flags."""
    if shutil.which("bwrap") is None:
        return False
    try:
        return subprocess.run(_bwrap_command(["true"], policy), timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _bwrap_command(argv: list[str], policy: SandboxPolicy) -> list[str]:
    """The same isolation with bubblewrap flags (untested here: no bwrap on this machine)."""
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    cmd += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for path in (*_PRIVATE_TMPFS, os.environ.get("HOME", "")):
        if path and path != "/":
            cmd += ["--tmpfs", path]
    covered = [p for p in (*_PRIVATE_TMPFS, os.environ.get("HOME", "")) if p and p != "/"]
    for keep in [*keep_paths(argv), *map(str, policy.readable)]:  # Python may live under $HOME
        if _needs_rebind(keep, covered):
            cmd += ["--ro-bind", keep, keep]
    cmd += ["--bind", str(policy.scratch), str(policy.scratch)]
    for hidden in policy.hidden:
        cmd += ["--tmpfs", str(hidden), "--remount-ro", str(hidden)]
    cmd.append("--")
    limits = []
    if policy.memory_bytes:
        limits.append(f"--as={policy.memory_bytes}")
    if policy.max_processes:
        limits.append(f"--nproc={policy.max_processes}")
    if limits and shutil.which("prlimit"):
        cmd += ["prlimit", *limits, "--"]
    return [*cmd, *argv]


# --------------------------------------------------------------------------- libc


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc with errno, for unshare/mount/umount2/prctl."""
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    """Raise OSError with errno when a libc call failed."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    """unshare(2); raises OSError."""
    _check(_libc().unshare(ctypes.c_int(flags)), "unshare")


def _enc(text: str | None) -> bytes | None:
    return text.encode() if text else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2); raises OSError."""
    result = _libc().mount(
        _enc(source), target.encode(), _enc(fstype), ctypes.c_ulong(flags), _enc(data)
    )
    _check(result, f"mount {target}")


def _prctl(option: int, value: int) -> None:
    """prctl(2) with one argument; raises OSError."""
    _check(_libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0), "prctl")


def _die_with_parent(parent_alive: Callable[[], bool]) -> None:
    """SIGKILL this process when its parent dies (and now, if it already has)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not parent_alive():
        os._exit(1)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _map_ids(inside_uid: int, outside_uid: int, inside_gid: int, outside_gid: int) -> None:
    """Map one uid and gid in the user namespace this process just created."""
    try:
        _write("/proc/self/setgroups", "deny")
    except FileNotFoundError:
        pass
    _write("/proc/self/uid_map", f"{inside_uid} {outside_uid} 1")
    _write("/proc/self/gid_map", f"{inside_gid} {outside_gid} 1")


def _exit_code(status: int) -> int:
    """A shell-style exit code for a waitpid status."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _forward_signals(target: Callable[[], int | None]) -> None:
    """Forward SIGINT and SIGTERM to the pid ``target()`` returns."""

    def handler(signum: int, _frame: object) -> None:
        pid = target()
        if pid:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _say(text: str) -> None:
    """One line on the launcher's stderr."""
    os.write(2, f"{text}\n".encode())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


# --------------------------------------------------------------------------- cgroups


@dataclass
class _Cgroup:
    """One cgroup folder we made for the tree, and which cap it enforces."""

    path: Path
    cap: str  # "memory" or "processes"
    version: int
    limit: int

    def add(self, pid: int) -> None:
        _write(str(self.path / "cgroup.procs"), str(pid))

    def exceeded(self) -> str | None:
        """Why the tree went over this cap, or None."""
        if self.cap == "memory":
            name = "memory.oom_control" if self.version == 1 else "memory.events"
            if _counter(self.path / name, "oom_kill") > 0:
                return f"memory over the {_gb(self.limit)} cap (cgroup v{self.version} OOM)"
        elif _counter(self.path / "pids.events", "max") > 0:
            return f"processes: a fork went over the {self.limit}-task cap (cgroup v{self.version})"
        return None

    def remove(self) -> None:
        for _ in range(40):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


def _counter(path: Path, key: str) -> int:
    """The value of ``key N`` in a cgroup events file (0 when missing)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_cgroups() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _cgroup_mounts() -> dict[str, str]:
    """Controller (or "" for cgroup2) -> where its hierarchy is mounted."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, opts = right.split(" ")[:3]
        point = _unescape(left.split(" ")[4])
        if fstype == "cgroup2":
            out.setdefault("", point)
        elif fstype == "cgroup":
            for opt in opts.split(","):
                out.setdefault(opt, point)
    return out


def _make_cgroup(cap: str, limit: int) -> _Cgroup | None:
    """A child of this process's cgroup enforcing one cap (v2 first, then v1), or None."""
    controller = "memory" if cap == "memory" else "pids"
    try:
        own, mounts = _own_cgroups(), _cgroup_mounts()
    except OSError:
        return None
    name = f"course-sandbox-{os.getpid()}-{controller}"
    for version, key in ((2, ""), (1, controller)):
        if key not in own or key not in mounts:
            continue
        parent = Path(mounts[key] + own[key])
        _remove_stale(parent)
        group = _try_cgroup(parent / name, version, controller, limit)
        if group:
            return _Cgroup(group, cap, version, limit)
    return None


def _try_cgroup(path: Path, version: int, controller: str, limit: int) -> Path | None:
    """Make ``path`` and set its limit; None (and nothing left behind) when not allowed."""
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        if version == 2 and controller not in (path / "cgroup.controllers").read_text().split():
            raise OSError("controller not delegated")
        for fname, value in _limit_files(version, controller, limit):
            if (path / fname).exists() or fname in ("memory.limit_in_bytes", "pids.max"):
                _write(str(path / fname), value)
        return path
    except OSError:
        path.rmdir()
        return None


def _limit_files(version: int, controller: str, limit: int) -> list[tuple[str, str]]:
    """The (file, value) pairs that set one cap."""
    if controller == "pids":
        return [("pids.max", str(limit))]
    if version == 1:
        return [("memory.limit_in_bytes", str(limit)), ("memory.memsw.limit_in_bytes", str(limit))]
    return [("memory.max", str(limit)), ("memory.swap.max", "0"), ("memory.oom.group", "1")]


def _remove_stale(parent: Path) -> None:
    """Remove cgroups left by launchers that were SIGKILLed (their pid is gone)."""
    try:
        for child in parent.glob("course-sandbox-*"):
            pid = int(child.name.split("-")[2])
            if not _pid_alive(pid):
                try:
                    child.rmdir()
                except OSError:
                    pass
    except (OSError, ValueError, IndexError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- mounts


def _unescape(field_text: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space)."""
    return field_text.encode().decode("unicode_escape").encode("latin-1").decode()


def _mounts() -> list[tuple[str, int]]:
    """(mount point, locked per-mount flags) of every mount, parents first."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        flags = 0
        for opt in fields[5].split(","):
            flags |= _LOCKED_OPTIONS.get(opt, 0)
        out.append((_unescape(fields[4]), flags))
    return out


def _remount_all_read_only() -> list[str]:
    """Remount every mount read-only; return the mount points where that failed."""
    failed = []
    for point, flags in _mounts():
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            if point not in failed:
                failed.append(point)
    return failed


def _locked_flags(point: str) -> int:
    """The locked per-mount flags of the topmost mount at ``point``."""
    flags = 0
    for mount_point, mount_flags in _mounts():
        if mount_point == point:
            flags = mount_flags
    return flags


def _private_tmpfs(path: str, mode: str, size: int | None) -> bool:
    """An empty writable tmpfs at ``path`` (made if missing); False when it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
        data = f"mode={mode}" + (f",size={size}" if size else "")
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, data)
        return True
    except OSError:
        return False


def _bind_scratch(scratch_fd: int, scratch: str) -> None:
    """Bind the scratch folder (opened before /tmp was covered) read-write at its path."""
    os.makedirs(scratch, exist_ok=True)
    _mount(f"/proc/self/fd/{scratch_fd}", scratch, None, MS_BIND)
    _mount(None, scratch, None, MS_REMOUNT | MS_BIND | _locked_flags(scratch))
    os.close(scratch_fd)


def _hide(path: str) -> None:
    """Cover a folder with an empty read-only tmpfs (nothing to do when it is not there)."""
    if os.path.isdir(path) and not os.path.islink(path):
        _mount(
            "tmpfs",
            path,
            "tmpfs",
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=4k,mode=0755",
        )


def _loopback_up() -> None:
    """Bring up ``lo`` in the new network namespace (it starts down)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, req))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP


def keep_paths(argv: list[str]) -> list[str]:
    """Folders the command needs to start (this Python, its packages, the command's own
    folder): bound back read-only where a private tmpfs covers them (Python often lives in
    $HOME, e.g. pyenv)."""
    import sysconfig

    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    exe = shutil.which(argv[0]) if argv else None
    if exe:
        found.add(os.path.dirname(os.path.realpath(exe)))
    for key in ("purelib", "platlib"):
        found |= _pth_folders(Path(sysconfig.get_paths()[key]))
    return sorted(os.path.realpath(p) for p in found if p and os.path.isdir(p))


def _pth_folders(site: Path) -> set[str]:
    """Absolute folders named in a site folder's .pth files and editable-install finders."""
    import re

    found: set[str] = set()
    try:
        files = [*site.glob("*.pth"), *site.glob("__editable__*finder.py")]
        for path in files:
            text = path.read_text(errors="replace")
            found |= {m for m in re.findall(r"['\"]?(/[^'\"\n;]+)", text) if os.path.isdir(m)}
    except OSError:
        pass
    return found


def _under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _needs_rebind(keep: str, covered: list[str]) -> bool:
    """Whether a kept folder lies strictly inside a private tmpfs (never HOME itself or above,
    which would bring all of HOME back)."""
    return any(_under(keep, c) and keep != c for c in covered) and not any(
        _under(c, keep) for c in covered
    )


def _bind_read_only(fd: int, path: str) -> None:
    """Bind an opened folder back read-only at its own path."""
    os.makedirs(path, exist_ok=True)
    _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(path))
    os.close(fd)


#: Devices the sandbox keeps (GPUs included); the rest of /dev (disks...) is not there.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEVICE_PREFIXES = ("nvidia", "dri", "kfd")  # NVIDIA and AMD GPUs


def _open_devices() -> dict[str, int]:
    """Open (O_PATH) the host devices the sandbox keeps, before /dev is covered."""
    names = [n for n in os.listdir("/dev") if n in _DEVICES or n.startswith(_DEVICE_PREFIXES)]
    fds = {}
    for name in names:
        try:
            fds[name] = os.open(f"/dev/{name}", os.O_PATH)
        except OSError:
            pass
    return fds


def _minimal_dev(fds: dict[str, int]) -> None:
    """A tmpfs /dev with only the kept devices bound in (as bubblewrap's --dev), so that host
    root inside cannot open raw disks."""
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in fds.items():
        path = f"/dev/{name}"
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(path)
        else:
            open(path, "w").close()
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, f"/dev/{name}")
    for folder in ("shm", "pts"):
        os.mkdir(f"/dev/{folder}")
    _mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _setup_mounts(
    policy: SandboxPolicy, keep: list[str], tmpfs_size: int | None
) -> tuple[list[str], list[str]]:
    """Build the sandbox's file view; return (mounts not read-only, tmpfs mount points)."""
    scratch = str(policy.scratch.resolve())
    scratch_fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    home = os.environ.get("HOME", "")
    covered = [*_PRIVATE_TMPFS, home] if home and os.path.abspath(home) != "/" else _PRIVATE_TMPFS
    keep = [k for k in keep if _needs_rebind(k, covered)]
    keep_fds = {k: os.open(k, os.O_PATH | os.O_DIRECTORY) for k in keep}
    devices = _open_devices()
    cwd = os.getcwd()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    not_read_only = _remount_all_read_only()
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _minimal_dev(devices)
    tmpfs = [p for p in _PRIVATE_TMPFS if _private_tmpfs(p, "1777", tmpfs_size)]
    if home and os.path.abspath(home) != "/" and _private_tmpfs(home, "0700", tmpfs_size):
        tmpfs.append(home)
    for path, fd in keep_fds.items():
        _bind_read_only(fd, path)
    _bind_scratch(scratch_fd, scratch)
    for hidden in policy.hidden:
        _hide(str(hidden.resolve()))
    try:
        os.chdir(cwd)  # re-resolve the working folder in the new view (scratch is rw there)
    except OSError:
        os.chdir(scratch)
    return [p for p in not_read_only if not p.startswith("/proc")], tmpfs


# --------------------------------------------------------------------------- watchdog


def _tree_usage(tmpfs: list[str]) -> tuple[int, int]:
    """(anonymous memory of every process here + bytes in our tmpfs, tasks), init excluded."""
    page = os.sysconf("SC_PAGE_SIZE")
    memory = tasks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            resident, shared = (
                int(x) for x in Path(f"/proc/{name}/statm").read_text().split()[1:3]
            )
            tasks += len(os.listdir(f"/proc/{name}/task"))
        except (OSError, ValueError):
            continue
        memory += (resident - shared) * page
    for path in tmpfs:
        try:
            st = os.statvfs(path)
            memory += (st.f_blocks - st.f_bfree) * st.f_frsize
        except OSError:
            pass
    return memory, tasks


def _watchdog_verdict(
    policy: SandboxPolicy, watch: dict[str, bool], tmpfs: list[str]
) -> str | None:
    """Why the tree is over a cap the watchdog enforces, or None."""
    memory, tasks = _tree_usage(tmpfs)
    if watch["memory"] and policy.memory_bytes and memory > policy.memory_bytes:
        return f"memory {_gb(memory)} over the {_gb(policy.memory_bytes)} cap (watchdog)"
    if watch["processes"] and policy.max_processes and tasks >= policy.max_processes:
        return f"processes: {tasks} tasks reached the {policy.max_processes}-task cap (watchdog)"
    return None


# --------------------------------------------------------------------------- the four processes


@dataclass
class _Plan:
    """What the launcher decided before forking: the policy, the command, the cgroups."""

    policy: SandboxPolicy
    argv: list[str]
    probe: bool
    keep: list[str] = field(default_factory=list)
    cgroups: list[_Cgroup] = field(default_factory=list)

    def mechanism(self, cap: str) -> str:
        for group in self.cgroups:
            if group.cap == cap:
                return f"cgroup v{group.version}"
        return "watchdog"


def _run_command(plan: _Plan, uid: int, gid: int) -> None:
    """In the forked command process: drop to a nested user namespace, limit, exec."""
    try:
        os.setsid()
        if plan.policy.memory_bytes:
            import resource

            lim = plan.policy.memory_bytes
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        if plan.policy.max_processes:
            import resource

            # Counted per user namespace (kernel >= 5.14), so it bounds the tree, though not
            # for host root. The margin lets the watchdog see the cap reached and kill.
            lim = plan.policy.max_processes + NPROC_MARGIN
            resource.setrlimit(resource.RLIMIT_NPROC, (lim, lim))
        _unshare(CLONE_NEWUSER)
        _map_ids(uid, 0, gid, 0)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.execvp(plan.argv[0], plan.argv)
    except BaseException as exc:  # noqa: BLE001 - report and die, never return to init's loop
        _say(f"course-sandbox: cannot start {plan.argv[0]}: {exc}")
        os._exit(127)


def _run_init(plan: _Plan, parent_pipe: int, uid: int, gid: int) -> None:
    """PID 1 of the sandbox: mounts, loopback, then run the command, reap, watch the caps."""
    try:
        _die_with_parent(lambda: _pipe_open(parent_pipe))
        size = plan.policy.memory_bytes
        not_ro, tmpfs = _setup_mounts(plan.policy, plan.keep, size)
        _loopback_up()
    except BaseException as exc:  # noqa: BLE001
        _say(f"course-sandbox: cannot set up the sandbox: {exc}")
        os._exit(125)
    if plan.probe:
        report = {
            "memory": plan.mechanism("memory"),
            "processes": plan.mechanism("processes"),
            "not_read_only": not_ro,
        }
        os.write(1, f"course-sandbox-probe: {json.dumps(report)}\n".encode())
    watch = {cap: plan.mechanism(cap) == "watchdog" for cap in ("memory", "processes")}
    command = os.fork()
    if command == 0:
        _run_command(plan, uid, gid)
    _forward_signals(lambda: command)
    watching = any(watch.values()) and (plan.policy.memory_bytes or plan.policy.max_processes)
    while True:
        status = _reap(command, block=not watching)
        if status is not None:
            os._exit(_exit_code(status))
        if watching:
            verdict = _watchdog_verdict(plan.policy, watch, tmpfs)
            if verdict:
                _say(f"{KILLED_PREFIX} {verdict}")
                os.kill(-1, signal.SIGKILL)
                os._exit(CAP_EXIT_CODE)
            time.sleep(POLL_S)


def _pipe_open(fd: int) -> bool:
    """Whether the writer of a pipe is still alive (no EOF)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) != b""
    except BlockingIOError:
        return True


def _reap(command: int, block: bool) -> int | None:
    """Reap every exited child; the command's wait status once it has exited."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            return None
        if pid == command:
            return status


def _run_child(plan: _Plan, launcher: int, go: int) -> None:
    """New namespaces; fork the sandbox's init and pass its exit status up."""
    try:
        _die_with_parent(lambda: os.getppid() == launcher)
        os.setsid()  # a signal to the launcher's process group must not reach us twice
        os.read(go, 1)  # wait until the launcher has put us in the cgroups
        uid, gid = os.getuid(), os.getgid()
        _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
        _map_ids(0, uid, 0, gid)
        alive_r, alive_w = os.pipe()
    except BaseException as exc:  # noqa: BLE001
        _say(f"course-sandbox: cannot create namespaces: {exc}")
        os._exit(125)
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        _run_init(plan, alive_r, uid, gid)
    os.close(alive_r)
    _forward_signals(lambda: init)
    _, status = os.waitpid(init, 0)
    os._exit(_exit_code(status))


def launch(
    policy: SandboxPolicy, argv: list[str], probe: bool = False, cgroups: bool = True
) -> int:
    """Run ``argv`` in the sandbox and return its exit code (the launcher's main work)."""
    plan = _Plan(policy, argv, probe, [*keep_paths(argv), *map(str, policy.readable)])
    for cap, limit in (("memory", policy.memory_bytes), ("processes", policy.max_processes)):
        group = _make_cgroup(cap, limit) if limit and cgroups else None
        if group:
            plan.cgroups.append(group)
    go_r, go_w = os.pipe()
    launcher = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(go_w)
        _run_child(plan, launcher, go_r)
    os.close(go_r)
    try:
        return _supervise(plan, child, go_w)
    finally:
        for group in plan.cgroups:
            group.remove()


def _supervise(plan: _Plan, child: int, go_w: int) -> int:
    """Put the child in the cgroups, forward signals, poll the caps, return the exit code."""
    for group in list(plan.cgroups):
        try:
            group.add(child)
        except OSError:
            plan.cgroups.remove(group)
            group.remove()
    os.write(go_w, b"g")
    os.close(go_w)
    _forward_signals(lambda: child)
    while True:
        pid, status = os.waitpid(child, 0 if not plan.cgroups else os.WNOHANG)
        if pid:
            return _exit_code(status)
        for group in plan.cgroups:
            verdict = group.exceeded()
            if verdict:
                _say(f"{KILLED_PREFIX} {verdict}")
                os.kill(child, signal.SIGKILL)  # init dies with it, and the namespace with init
                os.waitpid(child, 0)
                return CAP_EXIT_CODE
        time.sleep(POLL_S)


def main(args: list[str] | None = None) -> int:
    """``sandbox.py --policy JSON [--probe] -- CMD ARGS``."""
    parser = argparse.ArgumentParser(description="Run a command in the grader's sandbox.")
    parser.add_argument("--policy", required=True, help="SandboxPolicy as JSON")
    parser.add_argument("--probe", action="store_true", help="print what is enforced first")
    parser.add_argument("--no-cgroup", action="store_true", help="caps by the watchdog only")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("no command given after --")
    policy = SandboxPolicy.from_json(ns.policy)
    return launch(policy, command, probe=ns.probe, cgroups=not ns.no_cgroup)


if __name__ == "__main__":
    sys.exit(main())
