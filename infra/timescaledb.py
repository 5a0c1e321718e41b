"""Install the TimescaleDB extension into the local PostgreSQL.

Debian releases that package TimescaleDB get the package. Debian 12 has none, so we build
Debian's ``timescaledb`` *source* package from the next release (trixie) against the installed
PostgreSQL, with a private apt configuration so the system's sources are never touched, and we
never install trixie's binaries (they would pull a newer libc). That build is the Apache edition.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from infra.paths import Paths
from infra.proc import ServiceError, apt_install, run, say

SOURCE_SUITE = "trixie"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def pg_major() -> int:
    """The newest PostgreSQL major installed under /usr/lib/postgresql (0 when none)."""
    majors = [int(p.name) for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit()]
    return max(majors, default=0)


def pg_config(major: int) -> Path:
    return Path(f"/usr/lib/postgresql/{major}/bin/pg_config")


def is_installed(major: int) -> bool:
    if not pg_config(major).exists():
        return False
    share = run([pg_config(major), "--sharedir"]).stdout.strip()
    return (Path(share) / "extension" / "timescaledb.control").exists()


def system_mirror() -> str:
    """The Debian mirror the machine's own apt sources use (one-line or deb822 format)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if "security" not in m.group(1) and "/debian" in m.group(1):
                return m.group(1).rstrip("/")
        for block in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            if uris and "security" not in uris.group(1) and "/debian" in uris.group(1):
                return uris.group(1).rstrip("/")
    return DEFAULT_MIRROR


def _packaged_name(major: int) -> str | None:
    """Name of a binary TimescaleDB package for this PostgreSQL major, if the release has one."""
    for name in (f"postgresql-{major}-timescaledb", f"timescaledb-2-postgresql-{major}"):
        out = run(["apt-cache", "policy", name], check=False).stdout
        if re.search(r"Candidate:\s*(?!\(none\))\S+", out):
            return name
    return None


def ensure(paths: Paths, major: int) -> None:
    """Make ``CREATE EXTENSION timescaledb`` possible on the installed PostgreSQL ``major``."""
    if is_installed(major):
        return
    if shutil.which("apt-get"):
        run(["apt-get", "update", "-qq"], check=False)
        name = _packaged_name(major)
        if name:
            apt_install(name)
            return
    build_from_source(paths, major)


def build_from_source(paths: Paths, major: int) -> float:
    """Build and install the Apache edition from Debian's source package; returns build seconds."""
    apt_install(
        f"postgresql-server-dev-{major}",
        "cmake",
        "gcc",
        "make",
        "libssl-dev",
        "dpkg-dev",
        "xz-utils",
    )
    root = paths.cache / "timescaledb"
    apt_dir = root / "apt"
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb-src {system_mirror()} {SOURCE_SUITE} main\n")
    private = [
        "-o", f"Dir::Etc::sourcelist={sources}",
        "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o", "APT::Get::List-Cleanup=0",
    ]  # fmt: skip
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    log = paths.logs / "timescaledb-build.log"
    if not list(src.glob("timescaledb_*.dsc")):
        say(f"fetching Debian's timescaledb source package ({SOURCE_SUITE})")
        run(["apt-get", *private, "update", "-qq"], log=log)
        run(["apt-get", *private, "source", "--download-only", "timescaledb"], cwd=src, log=log)
    dsc = sorted(src.glob("timescaledb_*.dsc"))[-1]
    tree = root / f"build-{dsc.stem}-pg{major}"
    if not (tree / "CMakeLists.txt").exists():
        shutil.rmtree(tree, ignore_errors=True)
        run(["dpkg-source", "-x", "--no-check", dsc, tree], log=log)
    say(f"building TimescaleDB (Apache edition) from {dsc.name} against PostgreSQL {major}")
    t0 = time.monotonic()
    bdir = tree / "_build"
    run(
        [
            "cmake", "-S", tree, "-B", bdir,
            "-DAPACHE_ONLY=ON", "-DREGRESS_CHECKS=OFF", "-DUSE_TELEMETRY=OFF",
            "-DCMAKE_BUILD_TYPE=Release", f"-DPG_CONFIG={pg_config(major)}",
        ],
        log=log,
    )  # fmt: skip
    run(["make", "-C", bdir, "-j2"], log=log)
    seconds = time.monotonic() - t0
    run(["make", "-C", bdir, "install"], log=log)
    (paths.logs / "timescaledb-build-seconds").write_text(f"{seconds:.1f}\n")
    say(f"TimescaleDB built in {seconds:.1f}s and installed")
    if not is_installed(major):
        raise ServiceError(f"TimescaleDB build finished but is not installed; see {log}")
    return seconds
