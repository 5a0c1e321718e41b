"""The native load clients of ``nadi bench ws`` (``main.go`` here), built on first use.

The binary is cached under ``<NADI_HOME>/cache/wsload/<key>/wsload``, the key being the sha256
of the Go sources and module files, so it is rebuilt only when they change. A missing Go
toolchain fails at once with a message that says what to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from infra.go import GO_FALLBACKS
from infra.go import find_go as go_command

SOURCE = Path(__file__).resolve().parent


class GoMissingError(RuntimeError):
    """No ``go`` command: the load clients cannot be built."""


def source_key() -> str:
    h = hashlib.sha256()
    for f in sorted(SOURCE.iterdir()):
        if f.suffix == ".go" or f.name in ("go.mod", "go.sum"):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def find_go() -> str:
    go = go_command()
    if go is None:
        raise GoMissingError(
            "nadi bench ws needs Go (1.23 or newer) to build its native load clients "
            f"({SOURCE}): no `go` on PATH nor in {', '.join(GO_FALLBACKS) or '-'}. Install Go "
            "(https://go.dev/dl or the distribution's golang package) and run it again."
        )
    return go


def binary(home: Path, go: str | None = None) -> Path:
    """The built ``wsload`` for the current sources (built now when not cached)."""
    out = home / "cache" / "wsload" / source_key() / "wsload"
    if out.exists():
        return out
    go = go or find_go()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a concurrent build or a killed one never
    # leaves a half-written binary under the key.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".wsload-")
    os.close(fd)
    proc = subprocess.run(
        [go, "build", "-trimpath", "-o", tmp, "."],
        cwd=SOURCE,
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def run(exe: Path, mode: str, config: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``wsload <mode>`` with ``config`` on stdin; its one JSON line."""
    proc = subprocess.run(
        [str(exe), mode],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wsload {mode} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out
