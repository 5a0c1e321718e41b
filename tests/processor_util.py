"""Running MarketDataProcessor workers in tests: in-process tasks or real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis

from nadi.redis_keys import RedisKeys
from nadi.settings import WORKER_FIELDS, Settings
from streaming.processor.worker import MarketDataProcessor
from tests.kafka_util import create_topic


async def private_settings(settings: Settings, partitions: int = 4) -> Settings:
    topic = await create_topic(settings.kafka_bootstrap, "test.ticks", partitions)
    dlq = await create_topic(settings.kafka_bootstrap, "test.dlq", 1)
    return settings.model_copy(
        update={
            "topic_ticks": topic,
            "topic_dlq": dlq,
            "group_id": f"g-{uuid.uuid4().hex[:8]}",
            "metrics_port": 0,
        }
    )


async def reset_state(pg: asyncpg.Connection, settings: Settings) -> None:
    await pg.execute(
        "TRUNCATE ticks, sequence_gaps, candle_dirty, candles_1m, candles_5m, ingest_state"
    )
    r = aioredis.from_url(settings.redis_url)
    await r.flushdb()
    await r.aclose()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[MarketDataProcessor]:
    worker = MarketDataProcessor(settings, revoke_wait_s=5)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


def spawn_worker(
    settings: Settings, log_path: str, *, fault: str | None = None
) -> subprocess.Popen[bytes]:
    """A ``nadi process`` subprocess; ``fault`` ("<crash point>:<n>", see
    streaming/processor/crash.py) makes it SIGKILL itself there."""
    env = {**settings.env(*WORKER_FIELDS), "NADI_METRICS_PORT": "0"}
    env.pop("NADI_FAULT", None)
    if fault is not None:
        env["NADI_FAULT"] = fault
    out = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "command", "process"], env=env, stdout=out, stderr=out
    )


async def stored(pg: asyncpg.Connection) -> set[tuple[int, int, int]]:
    rows = await pg.fetch(
        "SELECT instrument_token, sequence_id, (extract(epoch FROM exchange_ts) * 1000000)::bigint FROM ticks"
    )
    return {(r[0], r[1], r[2]) for r in rows}


async def redis_keys(settings: Settings | None = None) -> RedisKeys:
    """The Redis key names of the test database (``Settings()`` by default)."""
    conn = await asyncpg.connect((settings or Settings()).pg_dsn)
    try:
        return await RedisKeys.load(conn)
    finally:
        await conn.close()
