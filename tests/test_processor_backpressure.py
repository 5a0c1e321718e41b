"""Backpressure: with Redis down the worker pauses its partitions, commits nothing, retries
with backoff, and resumes by itself when Redis comes back; then every tick is stored once."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import asyncpg
from prometheus_client import REGISTRY

from nadi.kafka_admin import group_offsets
from nadi.settings import Settings
from nadi.times import NS
from tests.feedgen import Feed
from tests.kafka_util import produce, wait_caught_up
from tests.processor_util import private_settings, reset_state, running_worker, stored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_redis_down_pauses_then_resumes_by_itself(
    migrated: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    assert shutil.which("redis-server"), "redis-server must be installed (nadi services up)"
    port = _free_port()
    base = await private_settings(migrated, partitions=2)
    s = base.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    await reset_state(pg, base)
    feed = Feed(tokens=[738561, 408065], n=2000, dup_rate=0.5, start_ns=time.time_ns() - 600 * NS)
    produce(s.kafka_bootstrap, s.topic_ticks, feed.messages())
    retries_before = _metric("nadi_write_retries_total", {"sink": "state"})
    server: subprocess.Popen[bytes] | None = None
    try:
        async with running_worker(s):
            await asyncio.sleep(4)  # Redis is down: the worker must hold still
            assert _metric("nadi_partitions_paused") == 1
            assert _metric("nadi_write_retries_total", {"sink": "state"}) > retries_before
            _, committed = await asyncio.to_thread(
                group_offsets, s.kafka_bootstrap, s.group_id, s.topic_ticks
            )
            assert all(v < 0 for v in committed.values()), (
                "nothing may be committed while Redis is down"
            )
            assert await pg.fetchval("SELECT count(*) FROM ticks") == 0

            server = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--dir",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
            )
            await wait_caught_up(s.kafka_bootstrap, s.group_id, s.topic_ticks, timeout_s=60)
            assert _metric("nadi_partitions_paused") == 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    assert await stored(pg) == feed.unique
    assert _metric("nadi_ticks_stored_total") >= len(feed.unique)
