"""The local stack is real: each service answers and the schema is what DESIGN.md says."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from nadi.db.migrate import run_migrations, timescaledb_license
from nadi.kafka_admin import ensure_topics, topic_specs
from nadi.settings import Settings
from tests.editions import EDITIONS, TIMESCALE


async def test_postgres_has_timescaledb(pg: asyncpg.Connection) -> None:
    version = await pg.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    assert version is not None and version.startswith("2.")
    preload = await pg.fetchval("SHOW shared_preload_libraries")
    assert "timescaledb" in preload
    # Sized for ingest, not the 128 MB default.
    assert (
        await pg.fetchval(
            "SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers'"
        )
        >= 1 << 30
    )


async def test_redis_answers(redis_client: aioredis.Redis) -> None:
    assert await redis_client.ping() is True
    await redis_client.set("nadi:test:ping", "1", ex=5)
    assert await redis_client.get("nadi:test:ping") == b"1"


async def test_kafka_topics_have_their_partitions(settings: Settings) -> None:
    created = await ensure_topics(settings)
    assert created == topic_specs(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        names = set(await admin.list_topics())
    finally:
        await admin.close()
    assert {settings.topic_ticks, settings.topic_dlq, settings.topic_replay} <= names
    assert created[settings.topic_ticks] == 12


async def test_migrate_twice_is_a_noop(migrated: Settings, pg: asyncpg.Connection) -> None:
    before = await pg.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert await run_migrations(migrated) == []
    after = await pg.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert before == after and len(before) >= 7


async def test_concurrent_migrators_apply_each_file_once(settings: Settings) -> None:
    s = settings.model_copy(
        update={"pg_dsn": settings.pg_dsn.rsplit("/", 1)[0] + "/nadi_migrate_race"}
    )
    admin = await asyncpg.connect(settings.pg_dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute('DROP DATABASE IF EXISTS "nadi_migrate_race" WITH (FORCE)')
        await admin.execute('CREATE DATABASE "nadi_migrate_race"')
        results = await asyncio.gather(*(run_migrations(s) for _ in range(4)))
        applied = [v for r in results for v in r]
        assert sorted(applied) == sorted(set(applied)), "a migration ran twice"
        assert len(applied) >= 7
    finally:
        await admin.execute('DROP DATABASE IF EXISTS "nadi_migrate_race" WITH (FORCE)')
        await admin.close()


async def test_ticks_is_a_hypertable_with_the_unique_index(pg: asyncpg.Connection) -> None:
    dim = await pg.fetchrow(
        "SELECT column_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_name = 'ticks'"
    )
    assert dim is not None and dim["column_name"] == "exchange_ts"
    idx = await pg.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'ticks' AND indexdef LIKE 'CREATE UNIQUE%'"
    )
    assert idx is not None and "(instrument_token, exchange_ts, sequence_id)" in idx


async def test_candle_objects_match_the_license(pg: asyncpg.Connection) -> None:
    license_ = await timescaledb_license(pg)
    mode = await pg.fetchval("SELECT mode FROM candle_mode")
    caggs = {
        r["view_name"]
        for r in await pg.fetch(
            "SELECT view_name FROM timescaledb_information.continuous_aggregates"
        )
    }
    hypertables = {
        r["hypertable_name"]
        for r in await pg.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables")
    }
    if license_ == "apache":
        assert mode == "rollup"
        assert {"candles_1m", "candles_5m"} <= hypertables and not caggs
        assert await pg.fetchval("SELECT to_regclass('candle_dirty') IS NOT NULL")
    else:
        assert mode == "continuous_aggregate"
        assert {"candles_1m", "candles_5m"} <= caggs
    cols = [
        r["column_name"]
        for r in await pg.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'candles_1m' ORDER BY ordinal_position"
        )
    ]
    assert cols == [
        "bucket",
        "instrument_token",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "tick_count",
    ]


async def test_duplicate_tick_is_absorbed(pg: asyncpg.Connection) -> None:
    ts = datetime(2026, 11, 20, 4, 0, 0, 123456, tzinfo=UTC)
    sql = (
        "INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price, last_qty, feed) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
    )
    assert await pg.execute(sql, 999001, ts, 7, 101.5, 10, "A") == "INSERT 0 1"
    assert await pg.execute(sql, 999001, ts, 7, 101.5, 10, "B") == "INSERT 0 0"
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE instrument_token = 999001") == 1
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg.execute(sql.replace(" ON CONFLICT DO NOTHING", ""), 999001, ts, 7, 101.5, 10, "B")


def test_services_status_reports_all_running(migrated: Settings) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "command", "services", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = json.loads(out.stdout)
    tsl = TIMESCALE in EDITIONS  # make test starts the second cluster when it can be built
    assert [r["service"] for r in rows] == ["postgresql", "redis", "kafka"] + (
        ["postgresql-tsl"] if tsl else []
    )
    assert all(r["running"] for r in rows), rows
    licenses = [r["license"] for r in rows if r["service"].startswith("postgresql")]
    assert licenses == ["apache"] + (["timescale"] if tsl else [])
