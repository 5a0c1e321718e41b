"""Shared plumbing of the benchmarks: private database/topics, result lines, RSS sampling."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import psutil
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from nadi.db.migrate import run_migrations
from nadi.settings import WORKER_FIELDS, Settings


def bench_settings(base: Settings, name: str, partitions: int | None = None) -> Settings:
    """Settings pointing at a private database, Redis db and topics for one benchmark run."""
    run = uuid.uuid4().hex[:6]
    root = base.pg_dsn.rsplit("/", 1)[0]
    return base.model_copy(
        update={
            # Beside the caller's database (nadi -> nadi_bench), so runs with private databases
            # do not drop each other's.
            "pg_dsn": f"{root}/{base.pg_database}_bench",
            "redis_url": base.redis_url.rsplit("/", 1)[0] + "/14",
            "topic_ticks": f"bench.{name}.{run}",
            "topic_dlq": f"bench.{name}.dlq.{run}",
            "group_id": f"bench-{name}-{run}",
            "metrics_port": 0,
            "ticks_partitions": partitions or base.ticks_partitions,
        }
    )


async def fresh_database(s: Settings) -> None:
    """Recreate the benchmark's database. Its Redis keys are namespaced by the database's
    identity (nadi.redis_keys), so the new database never sees the old one's; those are
    deleted by their prefix rather than by flushing a Redis db another run may share."""
    import redis.asyncio as aioredis

    from nadi.redis_keys import RedisKeys

    old: RedisKeys | None = None
    try:
        conn = await asyncpg.connect(s.pg_dsn)
    except asyncpg.InvalidCatalogNameError:
        conn = None
    if conn is not None:
        try:
            old = await RedisKeys.load(conn)
        except (asyncpg.PostgresError, RuntimeError):
            old = None  # not migrated yet: no keys of its own
        finally:
            await conn.close()
    admin = await asyncpg.connect(s.pg_dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{s.pg_database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{s.pg_database}"')
    finally:
        await admin.close()
    await run_migrations(s)
    if old is not None:
        r = aioredis.from_url(s.redis_url)
        try:
            async for key in r.scan_iter(match=f"{old.prefix}*", count=1000):
                await r.unlink(key)
        finally:
            await r.aclose()


async def create_topics(s: Settings, *names_partitions: tuple[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, p, 1) for n, p in names_partitions])
    finally:
        await admin.close()


async def delete_topics(s: Settings, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    except Exception:
        pass
    finally:
        await admin.close()


def worker_env(s: Settings) -> dict[str, str]:
    return {**s.env(*WORKER_FIELDS), "NADI_METRICS_PORT": "0"}


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "command", *argv], env=env, stdout=fh, stderr=fh)


class PeakRss:
    """Samples a process's resident set size in the background; ``peak_mb`` is the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def emit(s: Settings, name: str, result: dict[str, object]) -> None:
    """Print the one JSON line and keep it under .nadi/bench/."""
    result = {"bench": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    line = json.dumps(result)
    out = s.home / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.jsonl").open("a") as fh:
        fh.write(line + "\n")
    print(line, flush=True)


# The raw baseline's table: ``ticks``' shape as a hypertable with only the unique key, empty,
# so a bench compares its path with a plain COPY + INSERT ... ON CONFLICT DO NOTHING.
RAW_BENCH_TABLE = """DROP TABLE IF EXISTS ticks_raw_bench;
   CREATE TABLE ticks_raw_bench (LIKE ticks INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
   SELECT create_hypertable('ticks_raw_bench', by_range('exchange_ts', INTERVAL '1 hour'),
                            create_default_indexes => FALSE);
   CREATE UNIQUE INDEX ON ticks_raw_bench (instrument_token, exchange_ts, sequence_id);"""
