"""Go tools built with ``go install`` into the user's cache (Toxiproxy, Centrifugo): found once,
built once, kept across checkouts like Kafka's jars."""

from __future__ import annotations

import shutil
from pathlib import Path

from infra.proc import ServiceError, run, say

# The official tarball's place, often not on PATH.
GO_FALLBACKS = ("/usr/local/go/bin/go",)


def find_go() -> str | None:
    """The ``go`` command, or None."""
    return shutil.which("go") or next((g for g in GO_FALLBACKS if Path(g).exists()), None)


def go_install(module: str, version: str, binary: Path, *, what: str, log: Path) -> Path:
    """``binary`` (GOBIN is its folder), built with ``go install module@version`` unless it
    exists; ``what`` names the tool in messages (e.g. "Toxiproxy", "Centrifugo (~3 min)")."""
    if binary.exists():
        return binary
    go = find_go()
    if go is None:
        raise ServiceError(f"{what} needs Go to build it (`go install`); Go was not found")
    say(f"go install {module}@{version} for {what}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    run(
        [go, "install", f"{module}@{version}"],
        env={"GOBIN": str(binary.parent), "CGO_ENABLED": "0"},
        log=log,
    )
    if not binary.exists():
        raise ServiceError(f"go install did not produce {binary}")
    return binary
