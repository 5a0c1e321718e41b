"""The local PostgreSQL + TimescaleDB clusters: ``$NADI_HOME/pg`` (Apache edition, the main one)
and, with ``--timescale-edition``, ``$NADI_HOME/pg-tsl`` (Timescale license, issue 9)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from infra import timescale_edition, timescaledb
from infra.paths import Paths
from infra.proc import ServiceError, apt_install, is_root, port_open, run, say
from nadi.settings import Settings

# Sized for ingest on a 2-core, 24 GiB machine rather than the 128 MB defaults: big WAL so
# checkpoints don't throttle COPY bursts, enough memory for index builds and rollup refreshes.
# Durability stays on (fsync, synchronous_commit): exactly-once relies on committed = on disk.
TUNING = {
    "shared_buffers": "2GB",
    "effective_cache_size": "8GB",
    "work_mem": "32MB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "wal_compression": "lz4",
    "wal_buffers": "64MB",
    "max_connections": "300",
    "max_worker_processes": "16",
    "max_parallel_workers": "2",
    "timescaledb.max_background_workers": "8",
    "timescaledb.telemetry_level": "off",
    "shared_preload_libraries": "timescaledb",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


class Postgres:
    """One local cluster. ``edition="apache"`` is the main one (NADI_PG_DSN, Debian's PostgreSQL
    with the Apache-edition TimescaleDB); ``edition="timescale"`` the second one on
    NADI_PG_TSL_PORT, run from the private prefix of the TSL build (infra/timescale_edition.py).
    Both have the same user, loopback-only listening, trust authentication and tuning."""

    def __init__(self, settings: Settings, paths: Paths, edition: str = "apache") -> None:
        if edition not in ("apache", "timescale"):
            raise ValueError(f"unknown TimescaleDB edition {edition!r}")
        self.s = settings
        self.paths = paths
        self.edition = edition
        tsl = edition == "timescale"
        self.root = paths.pg_tsl if tsl else paths.pg
        self.port = settings.pg_tsl_port if tsl else settings.pg_port
        self.name = "postgresql-tsl" if tsl else "postgresql"
        self.data = self.root / "data"
        self.sock = self.root / "run"
        self.log = paths.logs / ("postgres-tsl.log" if tsl else "postgres.log")
        # The TSL cluster remembers which build it runs on, so `down` and `status` work even
        # after NADI_TIMESCALE_SRC moved or vanished.
        self._prefix_file = self.root / "prefix"

    @property
    def major(self) -> int:
        return timescaledb.pg_major()

    def _bindir(self) -> Path:
        if self.edition == "timescale" and self._prefix_file.exists():
            return Path(self._prefix_file.read_text().strip())
        return Path(f"/usr/lib/postgresql/{self.major}/bin")

    def _bin(self, name: str) -> str:
        return str(self._bindir() / name)

    def _as_owner(self, cmd: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root: run its tools as the 'postgres' system user.
        return ["runuser", "-u", "postgres", "--", *cmd] if is_root() else cmd

    def install(self, build: bool = True) -> None:
        """Make the binaries available. ``build=False`` (TSL cluster): only the recorded build,
        never a new one; ServiceError when it is gone."""
        if self.major == 0:
            apt_install("postgresql", "postgresql-contrib")
        if self.edition == "apache":
            timescaledb.ensure(self.paths, self.major)
            return
        if not build:
            if not (self._prefix_file.exists() and (self._bindir() / "postgres").exists()):
                raise timescale_edition.BuildGone(f"the TSL build of {self.name} is gone")
            return
        tsl = timescale_edition.ensure_built(self.paths, self.s.timescale_src, self.major)
        if is_root():
            _traversable(tsl.prefix)
        self.root.mkdir(parents=True, exist_ok=True)
        before = self._bindir() if self._prefix_file.exists() else None
        if before != tsl.bindir and before is not None and self.running():
            # Never restarted behind its users' backs (tests of other sessions share it).
            say(f"{self.name} runs the build in {before}; `nadi services down` then `up` "
                f"switches it to {tsl.bindir}")  # fmt: skip
            return
        self._prefix_file.write_text(f"{tsl.bindir}\n")

    def _prepare_dirs(self) -> None:
        for d in (self.root, self.sock, self.paths.logs):
            d.mkdir(parents=True, exist_ok=True)
        if is_root():
            pw = pwd.getpwnam("postgres")
            _traversable(self.root)
            for d in (self.root, self.sock):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            if not self.log.exists():
                self.log.touch()
            os.chown(self.log, pw.pw_uid, pw.pw_gid)

    def initdb(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        say(f"initdb {self.data}")
        self._prepare_dirs()
        run(
            self._as_owner(
                [self._bin("initdb"), "-D", str(self.data), "-U", self.s.pg_user,
                 "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"]
            ),
            log=self.log.with_suffix(".initdb.log"),
        )  # fmt: skip
        self._write_conf()

    def _write_conf(self) -> bool:
        """Write conf.d/nadi.conf; True when its content changed."""
        conf = dict(TUNING)
        conf.update(
            {
                "listen_addresses": f"'{self.s.pg_host}'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.sock}'",
            }
        )
        if self.edition == "timescale":
            # The TSL build's default, made explicit: SHOW answers even in a database without
            # the extension, and a wrong build fails at CREATE EXTENSION, not silently.
            conf["timescaledb.license"] = "'timescale'"
        lines = [f"{k} = {v if v.startswith(chr(39)) else repr(v)}" for k, v in conf.items()]
        (self.data / "conf.d").mkdir(exist_ok=True)
        target = self.data / "conf.d" / "nadi.conf"
        text_new = "# written by `nadi services up`\n" + "\n".join(lines) + "\n"
        changed = not target.exists() or target.read_text() != text_new
        if changed:
            target.write_text(text_new)
        main = self.data / "postgresql.conf"
        text = main.read_text()
        if "include_dir = 'conf.d'" not in text:
            main.write_text(text + "\ninclude_dir = 'conf.d'\n")
        if is_root():
            pw = pwd.getpwnam("postgres")
            for p in (target, target.parent):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        return changed

    def running(self) -> bool:
        out = run(
            self._as_owner([self._bin("pg_ctl"), "status", "-D", str(self.data)]), check=False
        )
        return out.returncode == 0

    def start(self, build: bool = True) -> None:
        self.install(build)
        self.initdb()
        self._prepare_dirs()
        changed = self._write_conf()  # settings may have moved the port since initdb
        if self.running():
            if changed:  # reloadable settings take effect now; a new port needs a restart
                run(self._as_owner([self._bin("pg_ctl"), "reload", "-D", str(self.data)]))
        else:
            if port_open(self.s.pg_host, self.port):
                knob = "NADI_PG_TSL_PORT" if self.edition == "timescale" else "NADI_PG_DSN"
                raise ServiceError(
                    f"port {self.port} is taken by another PostgreSQL; stop it or set {knob}"
                )
            say(f"starting {self.name} {self.major} ({self.edition} edition) on {self.where}")
            run(
                self._as_owner(
                    [self._bin("pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                     "-w", "-t", "120"]
                )
            )  # fmt: skip
        self._ensure_database()

    def _psql(self, sql: str, db: str = "postgres") -> str:
        cmd = [self._bin("psql"), "-h", self.s.pg_host, "-p", str(self.port),
               "-U", self.s.pg_user, "-d", db, "-tAX", "-v", "ON_ERROR_STOP=1", "-c", sql]  # fmt: skip
        return run(cmd).stdout.strip()

    def _ensure_database(self) -> None:
        db = self.s.pg_database
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'"):
            say(f"creating database {db}")
            self._psql(f'CREATE DATABASE "{db}"')

    def stop(self) -> None:
        if (self.data / "PG_VERSION").exists() and self.running():
            say(f"stopping {self.name}")
            run(
                self._as_owner(
                    [self._bin("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"]
                )
            )

    def restart(self) -> None:
        run(self._as_owner([self._bin("pg_ctl"), "restart", "-D", str(self.data), "-m", "fast", "-w",
                            "-l", str(self.log)]))  # fmt: skip

    @property
    def where(self) -> str:
        return f"{self.s.pg_host}:{self.port}"

    def license(self) -> str | None:
        """``timescaledb.license`` as the Nadi database sees it (None when nothing says: the
        setting exists once the extension is loaded, or when the config names it)."""
        for db in (self.s.pg_database, "postgres"):
            try:
                value = self._psql("SELECT current_setting('timescaledb.license', true)", db)
            except ServiceError:
                continue
            if value:
                return value
        return None

    def status(self) -> dict[str, object]:
        up = (self.data / "PG_VERSION").exists() and self.running()
        return {
            "service": self.name,
            "running": up,
            "where": self.where,
            "version": f"PostgreSQL {self.major} + TimescaleDB",
            "license": self.license() if up else None,
            "data": str(self.data),
            "log": str(self.log),
        }


def _traversable(path: Path) -> None:
    """Let the 'postgres' user reach ``path``: make every ancestor searchable (o+x, not o+r)."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
