"""`nadi services` on a second, private stack (own NADI_HOME and ports): idempotent `up`,
`down` then `up` keeps the data. Slow-ish (~30 s) because it boots real servers twice."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition


def _nadi(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nadi", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_up_is_idempotent_and_down_up_keeps_data(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "NADI_HOME": str(tmp_path / "home"),
        "NADI_PG_DSN": "postgresql://postgres@127.0.0.1:25432/nadi",
        "NADI_REDIS_URL": "redis://127.0.0.1:26379/0",
        "NADI_KAFKA_BOOTSTRAP": "127.0.0.1:29092",
        "NADI_KAFKA_HEAP": "384M",
        "NADI_TOPIC_TICKS": "ticks.raw",
        "NADI_TOPIC_DLQ": "ticks.dlq",
        "NADI_TOPIC_REPLAY": "ticks.replay",
    }
    try:
        first = _nadi(env, "services", "up")
        assert first.returncode == 0, first.stderr
        t0 = time.monotonic()
        second = _nadi(env, "services", "up")
        warm = time.monotonic() - t0
        assert second.returncode == 0, second.stderr
        assert warm < 15, f"second `services up` took {warm:.1f}s"

        status = json.loads(_nadi(env, "services", "status", "--json").stdout)
        assert [r["where"] for r in status] == [
            "127.0.0.1:25432",
            "127.0.0.1:26379",
            "127.0.0.1:29092",
        ]
        assert all(r["running"] for r in status)

        asyncio.run(_write_marks(env))
        down = _nadi(env, "services", "down")
        assert down.returncode == 0, down.stderr
        stopped = _nadi(env, "services", "status", "--json")
        assert stopped.returncode == 3 and not any(r["running"] for r in json.loads(stopped.stdout))

        again = _nadi(env, "services", "up")
        assert again.returncode == 0, again.stderr
        assert asyncio.run(_read_marks(env)) == (1, b"kept", b"kept")
    finally:
        _nadi(env, "services", "down")


async def _write_marks(env: dict[str, str]) -> None:
    conn = await asyncpg.connect(env["NADI_PG_DSN"])
    await conn.execute("CREATE TABLE keepme (x int); INSERT INTO keepme VALUES (1)")
    await conn.close()
    r = redis.Redis.from_url(env["NADI_REDIS_URL"])
    r.set("keepme", "kept")
    r.save()
    r.close()
    producer = AIOKafkaProducer(bootstrap_servers=env["NADI_KAFKA_BOOTSTRAP"], acks="all")
    await producer.start()
    await producer.send_and_wait("ticks.raw", b"kept", key=b"1", partition=0)
    await producer.stop()


async def _read_marks(env: dict[str, str]) -> tuple[int, object, object]:
    conn = await asyncpg.connect(env["NADI_PG_DSN"])
    x = await conn.fetchval("SELECT x FROM keepme")
    await conn.close()
    r = redis.Redis.from_url(env["NADI_REDIS_URL"])
    kept = r.get("keepme")
    r.close()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env["NADI_KAFKA_BOOTSTRAP"], enable_auto_commit=False
    )
    await consumer.start()
    tp = TopicPartition("ticks.raw", 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    batch = await consumer.getmany(tp, timeout_ms=10_000)
    await consumer.stop()
    values = [m.value for m in batch.get(tp, [])]
    return x, kept, values[0] if values else None
