"""The local PostgreSQL + TimescaleDB cluster under ``$NADI_HOME/pg``."""

from __future__ import annotations

import os
import pwd

from infra import timescaledb
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
    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.s = settings
        self.paths = paths
        self.data = paths.pg / "data"
        self.sock = paths.pg / "run"
        self.log = paths.logs / "postgres.log"

    @property
    def major(self) -> int:
        return timescaledb.pg_major()

    def _bin(self, name: str) -> str:
        return f"/usr/lib/postgresql/{self.major}/bin/{name}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root: run its tools as the 'postgres' system user.
        return ["runuser", "-u", "postgres", "--", *cmd] if is_root() else cmd

    def install(self) -> None:
        if self.major == 0:
            apt_install("postgresql", "postgresql-contrib")
        timescaledb.ensure(self.paths, self.major)

    def _prepare_dirs(self) -> None:
        for d in (self.paths.pg, self.sock, self.paths.logs):
            d.mkdir(parents=True, exist_ok=True)
        if is_root():
            pw = pwd.getpwnam("postgres")
            # The postgres user must reach the data dir: make the ancestors traversable.
            for parent in reversed(self.paths.pg.parents):
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
            for d in (self.paths.pg, self.sock):
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

    def _write_conf(self) -> None:
        conf = dict(TUNING)
        conf.update(
            {
                "listen_addresses": f"'{self.s.pg_host}'",
                "port": str(self.s.pg_port),
                "unix_socket_directories": f"'{self.sock}'",
            }
        )
        lines = [f"{k} = {v if v.startswith(chr(39)) else repr(v)}" for k, v in conf.items()]
        (self.data / "conf.d").mkdir(exist_ok=True)
        target = self.data / "conf.d" / "nadi.conf"
        target.write_text("# written by `nadi services up`\n" + "\n".join(lines) + "\n")
        main = self.data / "postgresql.conf"
        text = main.read_text()
        if "include_dir = 'conf.d'" not in text:
            main.write_text(text + "\ninclude_dir = 'conf.d'\n")
        if is_root():
            pw = pwd.getpwnam("postgres")
            for p in (target, target.parent):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def running(self) -> bool:
        out = run(
            self._as_owner([self._bin("pg_ctl"), "status", "-D", str(self.data)]), check=False
        )
        return out.returncode == 0

    def start(self) -> None:
        self.install()
        self.initdb()
        self._prepare_dirs()
        self._write_conf()  # settings may have moved the port since initdb
        if not self.running():
            if port_open(self.s.pg_host, self.s.pg_port):
                raise ServiceError(
                    f"port {self.s.pg_port} is taken by another PostgreSQL; stop it or set NADI_PG_DSN"
                )
            say(f"starting PostgreSQL {self.major} on {self.s.pg_host}:{self.s.pg_port}")
            run(
                self._as_owner(
                    [self._bin("pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                     "-w", "-t", "120"]
                )
            )  # fmt: skip
        self._ensure_database()

    def _psql(self, sql: str, db: str = "postgres") -> str:
        cmd = [self._bin("psql"), "-h", self.s.pg_host, "-p", str(self.s.pg_port),
               "-U", self.s.pg_user, "-d", db, "-tAX", "-v", "ON_ERROR_STOP=1", "-c", sql]  # fmt: skip
        return run(cmd).stdout.strip()

    def _ensure_database(self) -> None:
        db = self.s.pg_database
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'"):
            say(f"creating database {db}")
            self._psql(f'CREATE DATABASE "{db}"')

    def stop(self) -> None:
        if (self.data / "PG_VERSION").exists() and self.running():
            say("stopping PostgreSQL")
            run(
                self._as_owner(
                    [self._bin("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"]
                )
            )

    def restart(self) -> None:
        run(self._as_owner([self._bin("pg_ctl"), "restart", "-D", str(self.data), "-m", "fast", "-w",
                            "-l", str(self.log)]))  # fmt: skip

    def status(self) -> dict[str, object]:
        up = (self.data / "PG_VERSION").exists() and self.running()
        return {
            "service": "postgresql",
            "running": up,
            "where": f"{self.s.pg_host}:{self.s.pg_port}",
            "version": f"PostgreSQL {self.major} + TimescaleDB",
            "data": str(self.data),
            "log": str(self.log),
        }
