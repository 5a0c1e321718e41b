"""Exactly-once under failure: a worker SIGKILLed at random moments, Redis flushed, and
PostgreSQL restarted, all while a stream of 100k+ ticks with duplicates and gaps flows."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from infra.paths import Paths
from infra.postgres import Postgres
from nadi.settings import Settings
from tests.feedgen import Feed
from tests.kafka_util import produce, wait_caught_up
from tests.processor_util import private_settings, redis_keys, reset_state, spawn_worker, stored

pytestmark = pytest.mark.slow
TOKENS = [738561, 408065, 2953217, 341249, 1270529, 779521, 424961, 2714625, 60417, 225537]


def _produce_slowly(
    s: Settings, messages: list[tuple[bytes | None, bytes]], seconds: float
) -> threading.Thread:
    chunks = 20
    size = len(messages) // chunks + 1

    def run() -> None:
        for i in range(chunks):
            produce(s.kafka_bootstrap, s.topic_ticks, messages[i * size : (i + 1) * size])
            time.sleep(seconds / chunks)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


async def _scenario(
    settings: Settings,
    tmp_path: Path,
    disrupt: Callable[[int], object],
    disruptions: int,
    seed: int,
) -> dict[str, int]:
    s = await private_settings(settings, partitions=6)
    admin = await asyncpg.connect(s.pg_dsn)
    await reset_state(admin, s)
    await admin.close()
    feed = Feed(tokens=TOKENS, n=100_000, dup_rate=0.3, gap_rate=0.002, seed=seed)
    messages = feed.messages()
    rng = random.Random(seed)
    log = str(tmp_path / "worker.log")
    worker = spawn_worker(s, log)
    producer = _produce_slowly(s, messages, seconds=8)
    kills = 0
    try:
        for i in range(disruptions):
            await asyncio.sleep(rng.uniform(0.8, 2.5))
            result = disrupt(i)
            if result == "kill":
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                kills += 1
                worker = spawn_worker(s, log)
        await asyncio.to_thread(producer.join)
        await wait_caught_up(s.kafka_bootstrap, s.group_id, s.topic_ticks, timeout_s=180)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, Path(log).read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        rows = await stored(conn)
        total = await conn.fetchval("SELECT count(*) FROM ticks")
        gap_rows = await conn.fetch("SELECT instrument_token, from_seq, to_seq FROM sequence_gaps")
        stale = await conn.fetchval("SELECT count(*) FROM ticks WHERE status = 'STALE'")
    finally:
        await conn.close()
    figures = {
        "messages_sent": len(messages),
        "unique_valid_ticks": len(feed.unique),
        "redundant_duplicates_sent": len(messages) - len(feed.unique),
        "kills": kills,
        "disruptions": disruptions,
        "rows_stored": total,
        "duplicates_stored": total - len(rows),
        "missing": len(feed.unique - rows),
        "extra": len(rows - feed.unique),
    }
    # The ring got every tick once too (it is bounded, so check what it still holds).
    import msgspec
    import redis.asyncio as aioredis

    r = aioredis.from_url(s.redis_url)
    keys = await redis_keys(s)
    ring_dups = 0
    for token in TOKENS:
        entries: Any = await r.xrange(keys.ring(token))
        seqs = [msgspec.json.decode(f[b"d"])["sequence_id"] for _, f in entries]
        ring_dups += len(seqs) - len(set(seqs))
        expected = sorted(q for tok, q, _ in feed.unique if tok == token)[-len(seqs) :]
        assert sorted(seqs) == expected, f"ring of {token} is not the tail of its ticks"
    await r.aclose()
    figures["ring_duplicates"] = ring_dups
    assert ring_dups == 0
    last_seq = {t: max(seq for tok, seq, _ in feed.unique if tok == t) for t in TOKENS}
    expected_holes = {(t, q) for t, qs in feed.dropped.items() for q in qs if q < last_seq[t]}
    recorded_holes = {(g[0], q) for g in gap_rows for q in range(g[1], g[2] + 1)}
    figures["gaps_recorded"] = len(gap_rows)
    figures["stale_ticks"] = stale
    assert recorded_holes == expected_holes, "gaps must be recorded exactly, whatever crashed"
    assert stale == len(gap_rows)
    assert len(messages) >= 100_000
    assert total == len(rows) == len(feed.unique), figures
    assert rows == feed.unique, figures
    return figures


def _record(name: str, figures: dict[str, int], settings: Settings) -> None:
    out = settings.home / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"crash_{name}.json").write_text(json.dumps(figures) + "\n")
    print(name, json.dumps(figures))


async def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(
    migrated: Settings, tmp_path: Path
) -> None:
    figures = await _scenario(migrated, tmp_path, lambda i: "kill", disruptions=5, seed=11)
    assert figures["kills"] == 5
    _record("sigkill", figures, migrated)


async def test_redis_flushed_mid_stream(migrated: Settings, tmp_path: Path) -> None:
    import redis

    def flush(i: int) -> str:
        r = redis.Redis.from_url(migrated.redis_url)
        r.flushdb()
        r.close()
        return "kill" if i == 1 else "flushed"  # and one kill in between, for good measure

    figures = await _scenario(migrated, tmp_path, flush, disruptions=3, seed=12)
    _record("redis_flush", figures, migrated)


async def test_postgres_restarted_mid_stream(migrated: Settings, tmp_path: Path) -> None:
    pg = Postgres(migrated, Paths.from_settings(migrated))

    def restart(i: int) -> str:
        pg.restart()
        return "restarted"

    figures = await _scenario(migrated, tmp_path, restart, disruptions=2, seed=13)
    _record("postgres_restart", figures, migrated)
