"""The local Redis server under ``$NADI_HOME/redis`` (Debian's package, loopback only)."""

from __future__ import annotations

import shutil

from infra.paths import Paths
from infra.proc import ServiceError, apt_install, port_open, read_pid, run, say, stop_pid, wait_port
from nadi.settings import Settings


class RedisServer:
    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.s = settings
        self.dir = paths.redis
        self.conf = self.dir / "redis.conf"
        self.pidfile = self.dir / "redis.pid"
        self.log = paths.logs / "redis.log"

    def install(self) -> None:
        if not shutil.which("redis-server"):
            apt_install("redis-server")

    def _write_conf(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Snapshots, not AOF: everything here can be lost (the ring is a cache of the database,
        # and the processor tolerates lost dedup and sequence keys; the DB unique key decides),
        # and AOF on the ingest path doubled Redis's CPU (every XADD logged, frequent rewrites).
        # A clean stop (SIGTERM) writes a final snapshot, so `services down/up` keeps the ring.
        self.conf.write_text(
            "\n".join(
                [
                    f"bind {self.s.redis_host}",
                    f"port {self.s.redis_port}",
                    "protected-mode yes",
                    "daemonize yes",
                    f"pidfile {self.pidfile}",
                    f"dir {self.dir}",
                    f"logfile {self.log}",
                    "appendonly no",
                    "save 900 1 300 100000",
                    "maxmemory 4gb",
                    "maxmemory-policy volatile-lru",
                    "tcp-backlog 4096",
                    "maxclients 10000",
                ]
            )
            + "\n"
        )

    def running(self) -> bool:
        return read_pid(self.pidfile) is not None

    def start(self) -> None:
        self.install()
        if self.running():
            return
        if port_open(self.s.redis_host, self.s.redis_port):
            raise ServiceError(
                f"port {self.s.redis_port} is taken by another Redis; stop it or set NADI_REDIS_URL"
            )
        self._write_conf()
        say(f"starting Redis on {self.s.redis_host}:{self.s.redis_port}")
        run(["redis-server", str(self.conf)])
        wait_port(self.s.redis_host, self.s.redis_port, 30, "Redis", self.log)

    def stop(self) -> None:
        if self.running():
            say("stopping Redis")
            stop_pid(self.pidfile)

    def status(self) -> dict[str, object]:
        return {
            "service": "redis",
            "running": self.running(),
            "where": f"{self.s.redis_host}:{self.s.redis_port}",
            "pid": read_pid(self.pidfile),
            "data": str(self.dir),
            "log": str(self.log),
        }
