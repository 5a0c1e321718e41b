"""The Timescale-licensed TimescaleDB (TSL module included), built from source.

Debian's package is the Apache-only build, so the continuous-aggregate and compression paths
need this one. It is built into a private, relocatable copy of the installed PostgreSQL
(``lib/postgresql/<major>``, ``share/postgresql/<major>`` and ``include/postgresql`` under one
prefix: PostgreSQL finds its share and library directories relative to its binaries), so the
system's Apache-edition extension files are never touched and both editions run side by side.

Cache layout, ``~/.cache/nadi/timescaledb-tsl/<key>/`` where the key is the source's sha256
(a tarball's bytes, or a tree's paths and bytes), the PostgreSQL version and the recipe:

- ``pg/``     the prefix: PostgreSQL's copy with the TSL build installed into it
- ``src/``    the unpacked tarball (none when the source is a tree)
- ``build/``  cmake's build directory
- ``ready``   written last (JSON: source, seconds); without it the directory is rebuilt

A second ``up`` or a fresh clone with the same source finds ``ready`` and builds nothing.
A lock file per key serialises concurrent builds (two ``nadi services up`` at once).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.paths import Paths
from infra.proc import ServiceError, apt_install, run, say

# Bump when the build recipe (flags, layout) changes: it is part of the cache key.
RECIPE = 1
CMAKE_FLAGS = (
    "-DREGRESS_CHECKS=OFF",
    "-DTAP_CHECKS=OFF",
    "-DWARNINGS_AS_ERRORS=OFF",
    "-DUSE_TELEMETRY=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)
JOBS = 2


class SourceMissing(ServiceError):
    """NADI_TIMESCALE_SRC names nothing: the Timescale edition cannot be built here."""


class BuildGone(ServiceError):
    """The build a TSL cluster was made with is no longer in the cache."""


@dataclass(frozen=True)
class TslBuild:
    """A finished build: a PostgreSQL prefix whose TimescaleDB has the TSL module."""

    prefix: Path
    major: int

    @property
    def bindir(self) -> Path:
        return self.prefix / "lib" / "postgresql" / str(self.major) / "bin"

    @property
    def pkglibdir(self) -> Path:
        return self.prefix / "lib" / "postgresql" / str(self.major) / "lib"

    @property
    def extension_dir(self) -> Path:
        return self.prefix / "share" / "postgresql" / str(self.major) / "extension"

    def is_complete(self) -> bool:
        return (self.prefix.parent / "ready").exists() and any(
            self.pkglibdir.glob("timescaledb-tsl-*.so")
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_tree(root: Path) -> str:
    """Paths and bytes of every file of a source tree, build outputs and VCS data excluded."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in (".git", "build") or not p.is_file():
            continue
        h.update(str(rel).encode() + b"\0")
        h.update(_sha256_file(p).encode())
    return h.hexdigest()


def require_source(src: Path) -> None:
    """Raise unless ``src`` is a file (a tarball) or a TimescaleDB tree with its TSL module."""
    if src.is_file() or ((src / "CMakeLists.txt").is_file() and (src / "tsl").is_dir()):
        return
    if src.exists():
        raise ServiceError(f"{src} is neither a tarball nor a TimescaleDB tree with tsl/")
    raise SourceMissing(
        f"TimescaleDB source {src} not found (NADI_TIMESCALE_SRC): "
        "the Timescale edition cannot be built"
    )


def source_sha256(src: Path) -> str:
    """The sha256 of a source tarball, or of an unpacked tree's contents."""
    require_source(src)
    return _sha256_file(src) if src.is_file() else _sha256_tree(src)


def pg_version(major: int) -> str:
    """``15.20`` for the installed PostgreSQL ``major`` (from its pg_config)."""
    out = run([f"/usr/lib/postgresql/{major}/bin/pg_config", "--version"]).stdout
    return out.split()[1]


def cache_dir(paths: Paths, src_sha: str, major: int) -> Path:
    return paths.cache / "timescaledb-tsl" / f"{src_sha[:16]}-pg{pg_version(major)}-r{RECIPE}"


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_tools(major: int) -> None:
    missing = [t for t in ("cmake", "gcc", "make") if shutil.which(t) is None]
    if not Path(f"/usr/include/postgresql/{major}/server/postgres.h").exists():
        missing.append(f"postgresql-server-dev-{major}")
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev")
    if missing:
        apt_install(*missing)


def _relocatable_copy(prefix: Path, major: int) -> None:
    """Copy the installed PostgreSQL under ``prefix``, minus its TimescaleDB files."""
    for sub in (f"lib/postgresql/{major}", f"share/postgresql/{major}", "include/postgresql"):
        shutil.copytree(Path("/usr") / sub, prefix / sub, symlinks=True)
    lib = prefix / "lib" / "postgresql" / str(major) / "lib"
    ext = prefix / "share" / "postgresql" / str(major) / "extension"
    for leftover in [*lib.glob("timescaledb*"), *ext.glob("timescaledb*")]:
        leftover.unlink()


def _unpack(tarball: Path, dest: Path, log: Path) -> Path:
    dest.mkdir(parents=True)
    run(["tar", "-xf", tarball, "-C", dest], log=log)
    if (dest / "CMakeLists.txt").exists():
        return dest
    tops = [p for p in dest.iterdir() if (p / "CMakeLists.txt").exists()]
    if len(tops) != 1 or not (tops[0] / "tsl").is_dir():
        raise ServiceError(f"{tarball} does not hold one TimescaleDB tree with tsl/")
    return tops[0]


def ensure_built(paths: Paths, src: Path, major: int) -> TslBuild:
    """The TSL build of ``src`` for PostgreSQL ``major``: from the cache, else built now."""
    src = src.resolve() if src.exists() else src
    sha = source_sha256(src)
    root = cache_dir(paths, sha, major)
    build = TslBuild(prefix=root / "pg", major=major)
    if build.is_complete():
        return build
    with _locked(root.parent / f"{root.name}.lock"):
        if build.is_complete():  # another process built it while we waited
            return build
        _ensure_tools(major)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        log = paths.logs / "timescaledb-tsl-build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        say(f"building TimescaleDB with the TSL module from {src} (log: {log})")
        t0 = time.monotonic()
        _relocatable_copy(build.prefix, major)
        tree = _unpack(src, root / "src", log) if src.is_file() else src
        pg_config = build.bindir / "pg_config"
        run(["cmake", "-S", tree, "-B", root / "build", f"-DPG_CONFIG={pg_config}", *CMAKE_FLAGS],
            log=log)  # fmt: skip
        run(["make", "-C", root / "build", f"-j{JOBS}"], log=log)
        run(["make", "-C", root / "build", "install"], log=log)
        seconds = time.monotonic() - t0
        if not any(build.pkglibdir.glob("timescaledb-tsl-*.so")):
            raise ServiceError(f"the TSL build finished without timescaledb-tsl-*.so; see {log}")
        shutil.rmtree(root / "build")  # ~100 MB of objects nobody reads again
        shutil.rmtree(root / "src", ignore_errors=True)
        (root / "ready").write_text(
            json.dumps({"source": str(src), "sha256": sha, "seconds": round(seconds, 1)}) + "\n"
        )
        say(f"TimescaleDB (TSL) built and installed under {build.prefix} in {seconds:.0f}s")
    return build
