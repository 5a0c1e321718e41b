"""Process helpers for the local services: run commands, wait for ports, read pid files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class ServiceError(RuntimeError):
    """A local service could not be installed or started; the message says what to look at."""


def say(msg: str) -> None:
    print(f"[nadi services] {msg}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; on failure raise with the tail of its output."""
    out = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(map(str, cmd))}\n{out.stdout}\n")
    if check and out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-25:])
        raise ServiceError(f"command failed ({out.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return out


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.2)
    hint = ""
    if log is not None and log.exists():
        hint = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise ServiceError(f"{what} did not open {host}:{port} within {timeout_s:.0f}s{hint}")


def read_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        # A service this process started (Kafka under the fault stack) and that died is a
        # zombie until reaped, and ``kill(pid, 0)`` would call it alive.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child (or already reaped)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def stop_pid(pidfile: Path, timeout_s: float = 30.0) -> bool:
    """SIGTERM the process in ``pidfile`` and wait for it; SIGKILL after ``timeout_s``."""
    pid = read_pid(pidfile)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_pid(pidfile) is None:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def is_root() -> bool:
    return os.geteuid() == 0


_apt_updated = False


def apt_install(*packages: str) -> None:
    """Install Debian packages (root only); ``apt-get update`` once per process first."""
    global _apt_updated
    if not shutil.which("apt-get"):
        raise ServiceError(f"apt-get not found; install {' '.join(packages)} by hand")
    if not is_root():
        raise ServiceError(f"{' '.join(packages)} missing; run as root or install them by hand")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        say("apt-get update")
        run(["apt-get", "update", "-qq"], env=env)
        _apt_updated = True
    say(f"apt-get install {' '.join(packages)}")
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)
