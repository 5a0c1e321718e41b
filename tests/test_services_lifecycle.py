"""`nadi services` on a second, private stack (own NADI_HOME and ports): idempotent `up`,
`down` then `up` keeps the data, with the Timescale-edition cluster too when its source is
there (its build comes from the shared cache). Slow-ish (~30 s): it boots real servers twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.editions import EDITIONS, TIMESCALE

TSL = TIMESCALE in EDITIONS
TSL_DSN = "postgresql://postgres@127.0.0.1:25433/nadi"


def _nadi(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "command", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def home() -> Iterator[Path]:
    """A NADI_HOME outside pytest's basetemp: any other pytest session on the machine resets
    /tmp/pytest-of-<user> to 0700, which would lock the 'postgres' user out of its data."""
    path = Path(tempfile.mkdtemp(prefix="nadi-lifecycle-"))
    try:
        yield path / "home"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_up_is_idempotent_and_down_up_keeps_data(home: Path) -> None:
    env = {
        **os.environ,
        "NADI_HOME": str(home),
        "NADI_PG_DSN": "postgresql://postgres@127.0.0.1:25432/nadi",
        "NADI_REDIS_URL": "redis://127.0.0.1:26379/0",
        "NADI_KAFKA_BOOTSTRAP": "127.0.0.1:29092",
        "NADI_KAFKA_HEAP": "384M",
        "NADI_TOPIC_TICKS": "ticks.raw",
        "NADI_TOPIC_DLQ": "ticks.dlq",
        "NADI_TOPIC_REPLAY": "ticks.replay",
        "NADI_PG_TSL_PORT": "25433",
    }
    up = ("services", "up", *(["--timescale-edition"] if TSL else []))
    try:
        first = _nadi(env, *up)
        assert first.returncode == 0, first.stderr
        t0 = time.monotonic()
        second = _nadi(env, *up)
        warm = time.monotonic() - t0
        assert second.returncode == 0, second.stderr
        assert warm < 15, f"second `services up` took {warm:.1f}s"

        status = json.loads(_nadi(env, "services", "status", "--json").stdout)
        assert [r["where"] for r in status] == [
            "127.0.0.1:25432",
            "127.0.0.1:26379",
            "127.0.0.1:29092",
            *(["127.0.0.1:25433"] if TSL else []),
        ]
        assert all(r["running"] for r in status)
        if TSL:
            assert status[-1]["service"] == "postgresql-tsl"
            assert status[-1]["license"] == "timescale"

        asyncio.run(_write_marks(env))
        down = _nadi(env, "services", "down")
        assert down.returncode == 0, down.stderr
        stopped = _nadi(env, "services", "status", "--json")
        assert stopped.returncode == 3 and not any(r["running"] for r in json.loads(stopped.stdout))

        # A plain `up` brings back the TSL cluster too, from the build it was made with.
        again = _nadi(env, "services", "up")
        assert again.returncode == 0, again.stderr
        assert "building" not in again.stderr
        assert asyncio.run(_read_marks(env)) == (1, b"kept", b"kept")
        if TSL:
            assert asyncio.run(_read_tsl_mark()) == 2
    finally:
        _nadi(env, "services", "down")


def test_timescale_edition_without_its_source_fails_before_starting_anything(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "NADI_HOME": str(tmp_path / "home"),
        "NADI_PG_DSN": "postgresql://postgres@127.0.0.1:25432/nadi",
        "NADI_TIMESCALE_SRC": str(tmp_path / "absent.tar.gz"),
    }
    out = _nadi(env, "services", "up", "--timescale-edition", timeout=60)
    assert out.returncode == 1
    assert "absent.tar.gz not found (NADI_TIMESCALE_SRC)" in out.stderr
    assert not (tmp_path / "home" / "pg").exists(), "something started before the check"


async def _write_marks(env: dict[str, str]) -> None:
    conn = await asyncpg.connect(env["NADI_PG_DSN"])
    await conn.execute("CREATE TABLE keepme (x int); INSERT INTO keepme VALUES (1)")
    await conn.close()
    if TSL:
        tsl = await asyncpg.connect(TSL_DSN)
        await tsl.execute("CREATE TABLE keepme (x int); INSERT INTO keepme VALUES (2)")
        await tsl.close()
    r = redis.Redis.from_url(env["NADI_REDIS_URL"])
    r.set("keepme", "kept")
    r.save()
    r.close()
    producer = AIOKafkaProducer(bootstrap_servers=env["NADI_KAFKA_BOOTSTRAP"], acks="all")
    await producer.start()
    await producer.send_and_wait("ticks.raw", b"kept", key=b"1", partition=0)
    await producer.stop()


async def _read_tsl_mark() -> int:
    conn = await asyncpg.connect(TSL_DSN)
    try:
        return int(await conn.fetchval("SELECT x FROM keepme"))
    finally:
        await conn.close()


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
