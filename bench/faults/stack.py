"""The private fault stack: PostgreSQL+TimescaleDB, Redis, Kafka and Toxiproxy of its own.

The fault matrix stops, kills, flushes and restores services, so it never touches the shared
ones: it runs its own under ``<home>`` (default ``.nadi/faults``) on ports of its own, reusing
``infra``'s service classes with a copy of the settings. Data stays on disk between runs (a
second start is fast); each row starts from a clean database, Redis and topics.

Toxiproxy sits between the workers and each service for the network rows: ``pg``, ``redis``
and ``kafka`` proxies. The broker has a second listener (``PROXIED``) advertised as the Kafka
proxy's address, so a client that came through the proxy reconnects through it too.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.kafka_server import KafkaServer
from infra.paths import Paths
from infra.postgres import Postgres
from infra.proc import is_root, read_pid, run
from infra.redis_server import RedisServer
from infra.toxiproxy import Toxiproxy, ToxiproxyClient
from nadi.db.migrate import run_migrations
from nadi.settings import Settings

DB = "nadi_faults"
TEMPLATE = "nadi_faults_template"

# The private cluster serves a few short-lived test databases: far smaller than the
# platform's tuning, so it starts fast and leaves memory to the rest of the machine.
_PG_OVERRIDES = """\
# written by bench/faults: the fault stack's small cluster (overrides nadi.conf)
shared_buffers = '256MB'
effective_cache_size = '1GB'
max_wal_size = '1GB'
min_wal_size = '256MB'
wal_buffers = '16MB'
maintenance_work_mem = '128MB'
max_connections = '200'
"""


@dataclass(frozen=True)
class Ports:
    """Below Linux's ephemeral range (32768-60999): a port there can be taken at any moment
    by some client's outgoing connection, and a restarted service would fail to bind it."""

    pg: int = 15432
    redis: int = 16379
    kafka: int = 19092
    kafka_controller: int = 19093
    kafka_proxied: int = 19094  # the broker's PROXIED listener (Toxiproxy's upstream)
    toxiproxy: int = 18474
    proxy_pg: int = 15433
    proxy_redis: int = 16380
    proxy_kafka: int = 19095  # what PROXIED advertises
    api: int = 18080  # `nadi api` of the API row


def _sigkill(what: str, pidfile: Path) -> None:
    """SIGKILL the service of ``pidfile`` and wait (30 s at most) until it is gone."""
    pid = read_pid(pidfile)
    assert pid is not None, f"the fault stack's {what} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while read_pid(pidfile) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} pid {pid} survived SIGKILL")
        time.sleep(0.05)


class FaultStack:
    """Owns the private services; rows start and stop them through it."""

    def __init__(self, base: Settings, home: Path | None = None, ports: Ports = Ports()) -> None:
        self.ports = ports
        self.home = (home or base.home / "faults").resolve()
        self.settings = base.model_copy(
            update={
                "pg_dsn": f"postgresql://postgres@127.0.0.1:{ports.pg}/{DB}",
                "redis_url": f"redis://127.0.0.1:{ports.redis}/0",
                "kafka_bootstrap": f"127.0.0.1:{ports.kafka}",
                "kafka_controller_port": ports.kafka_controller,
                "kafka_heap": "512M",
                "ticks_partitions": 6,
                "topic_ticks": "faults.ticks.raw",
                "topic_dlq": "faults.ticks.dlq",
                "topic_replay": "faults.ticks.replay",
                "home": self.home,
                "metrics_port": 0,
            }
        )
        self.paths = Paths(home=self.home, cache=Path.home() / ".cache" / "nadi")
        self.pg = Postgres(self.settings, self.paths)
        self.redis = RedisServer(self.settings, self.paths)
        self.kafka = KafkaServer(
            self.settings, self.paths, proxied=(ports.kafka_proxied, ports.proxy_kafka)
        )
        self.toxiproxy = Toxiproxy(self.paths, ports.toxiproxy)
        self.toxics: ToxiproxyClient | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.pg.install()
        self.pg.initdb()
        override = self.pg.data / "conf.d" / "zz-faults.conf"
        override.parent.mkdir(parents=True, exist_ok=True)
        override.write_text(_PG_OVERRIDES)
        if is_root():
            pw = pwd.getpwnam("postgres")
            os.chown(override, pw.pw_uid, pw.pw_gid)
        self.pg.start()
        self.redis.start()
        self.kafka.start()
        self.toxiproxy.start()
        self.toxics = ToxiproxyClient(self.toxiproxy.url)
        self.toxics.reset()
        p = self.ports
        self.toxics.ensure_proxy("pg", f"127.0.0.1:{p.proxy_pg}", f"127.0.0.1:{p.pg}")
        self.toxics.ensure_proxy("redis", f"127.0.0.1:{p.proxy_redis}", f"127.0.0.1:{p.redis}")
        self.toxics.ensure_proxy(
            "kafka", f"127.0.0.1:{p.proxy_kafka}", f"127.0.0.1:{p.kafka_proxied}"
        )
        asyncio.run(self._template())

    def stop(self) -> None:
        if self.toxics is not None:
            self.toxics.close()
        self.toxiproxy.stop()
        self.kafka.stop()
        self.redis.stop()
        self.pg.stop()

    async def heal(self) -> None:
        """Every service up and every proxy clean (idempotent)."""
        await asyncio.to_thread(self._heal)

    def _heal(self) -> None:
        self.pg.start()
        self.redis.start()
        self.kafka.start()
        self.toxiproxy.start()
        if self.toxics is not None:
            self.toxics.reset()

    def proxied(self, s: Settings) -> Settings:
        """``s`` with every service reached through its Toxiproxy proxy."""
        p = self.ports
        return s.model_copy(
            update={
                "pg_dsn": s.pg_dsn.replace(f":{p.pg}/", f":{p.proxy_pg}/"),
                "redis_url": s.redis_url.replace(f":{p.redis}/", f":{p.proxy_redis}/"),
                "kafka_bootstrap": f"127.0.0.1:{p.proxy_kafka}",
            }
        )

    # -- per-row state --------------------------------------------------------------------
    def _admin_dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports.pg}/{db}"

    async def _recreate(self, name: str) -> None:
        """Drop (forcing out any session) and create the database ``name``, empty."""
        conn = await asyncpg.connect(self._admin_dsn())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def _template(self) -> None:
        """A migrated template database, made once per start: each row's database is a copy
        of it (a file copy, not a migration run)."""
        await self._recreate(TEMPLATE)
        tpl = self.settings.model_copy(update={"pg_dsn": self._admin_dsn(TEMPLATE)})
        await run_migrations(tpl)
        conn = await asyncpg.connect(self._admin_dsn())
        try:
            # No connections to a template (TimescaleDB's scheduler would hold one open and
            # block every copy).
            await conn.execute(f'ALTER DATABASE "{TEMPLATE}" WITH ALLOW_CONNECTIONS false')
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                TEMPLATE,
            )
        finally:
            await conn.close()

    async def fresh_database(self, *, migrate: bool = False) -> None:
        """Drop the row database and make it anew: a copy of the template, or (``migrate``)
        created empty and migrated, as a user replacing a database would."""
        conn = await asyncpg.connect(self._admin_dsn())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
            if migrate:
                await conn.execute(f'CREATE DATABASE "{DB}"')
            else:
                for _ in range(50):  # a template copy fails while anything is connected to it
                    try:
                        await conn.execute(f'CREATE DATABASE "{DB}" TEMPLATE "{TEMPLATE}"')
                        break
                    except asyncpg.ObjectInUseError:
                        await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"template {TEMPLATE} stayed in use")
        finally:
            await conn.close()
        if migrate:
            await run_migrations(self.settings)

    async def flush_redis(self) -> None:
        r = aioredis.from_url(self.settings.redis_url)
        try:
            await r.flushall()
        finally:
            await r.aclose()

    async def create_topics(self, row: str, partitions: int) -> Settings:
        """Row settings: new input and DLQ topics and a new group id."""
        run_id = uuid.uuid4().hex[:8]
        topic, dlq = f"faults.{row}.{run_id}", f"faults.{row}.dlq.{run_id}"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(topic, partitions, 1), NewTopic(dlq, 1, 1)], timeout_ms=30_000
            )
        finally:
            await admin.close()
        return self.settings.model_copy(
            update={"topic_ticks": topic, "topic_dlq": dlq, "group_id": f"faults-{row}-{run_id}"}
        )

    async def delete_topics(self, s: Settings) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([s.topic_ticks, s.topic_dlq])
        finally:
            await admin.close()

    # -- faults on the services -------------------------------------------------------------
    def kill_kafka(self) -> None:
        _sigkill("Kafka", self.kafka.pidfile)

    def start_kafka(self) -> None:
        self.kafka.start()

    def redis_pid(self) -> int:
        pid = read_pid(self.redis.pidfile)
        assert pid is not None, "the fault stack's Redis is not running"
        return pid

    def kill_redis(self) -> None:
        """SIGKILL: no final snapshot (what the disk holds is what comes back)."""
        _sigkill("Redis", self.redis.pidfile)
        self.redis.pidfile.unlink(missing_ok=True)

    @property
    def rdb(self) -> Path:
        return self.redis.dir / "dump.rdb"

    def pg_dump(self, target: Path) -> None:
        run(
            self.pg._as_owner(
                [self.pg._bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.ports.pg),
                 "-U", "postgres", "-Fc", "-f", str(target), DB]
            )
        )  # fmt: skip

    async def pg_restore(self, dump: Path) -> None:
        """Replace the row database by the dump (TimescaleDB's pre/post restore protocol)."""
        await self._recreate(DB)
        conn = await asyncpg.connect(self._admin_dsn(DB))
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            await conn.execute("SELECT timescaledb_pre_restore()")
        finally:
            await conn.close()
        run(
            self.pg._as_owner(
                [self.pg._bin("pg_restore"), "-h", "127.0.0.1", "-p", str(self.ports.pg),
                 "-U", "postgres", "-d", DB, "--no-owner", str(dump)]
            ),
            check=False,  # TimescaleDB's own catalog entries warn; the check is the data
        )  # fmt: skip
        conn = await asyncpg.connect(self._admin_dsn(DB))
        try:
            await conn.execute("SELECT timescaledb_post_restore()")
        finally:
            await conn.close()
