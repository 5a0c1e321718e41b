"""Shared fixtures. Integration tests use the real local services started by
`nadi services up` (make test does that), in their own database, Redis db and topics, so a
running `make up` platform is not disturbed. A missing service fails the test loudly."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

# Test isolation: own database, Redis db and topics, set before any Settings() is built.
os.environ.setdefault("NADI_PG_DSN", "postgresql://postgres@127.0.0.1:5432/nadi_test")
os.environ.setdefault("NADI_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("NADI_TOPIC_TICKS", "test.ticks.raw")
os.environ.setdefault("NADI_TOPIC_DLQ", "test.ticks.dlq")
os.environ.setdefault("NADI_TOPIC_REPLAY", "test.ticks.replay")
os.environ.setdefault("NADI_GROUP_ID", "nadi-test-processor")
os.environ.setdefault("NADI_METRICS_PORT", "0")

from nadi.db.migrate import run_migrations
from nadi.settings import Settings


def _admin_dsn(s: Settings) -> str:
    return s.pg_dsn.rsplit("/", 1)[0] + "/postgres"


async def _recreate_database(s: Settings) -> None:
    try:
        conn = await asyncpg.connect(_admin_dsn(s), timeout=5)
    except (OSError, asyncpg.PostgresError) as e:
        pytest.fail(
            f"PostgreSQL at {s.pg_host}:{s.pg_port} is not reachable ({e}); run `nadi services up`"
        )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{s.pg_database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{s.pg_database}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def migrated(settings: Settings) -> Iterator[Settings]:
    """A freshly created, fully migrated test database."""
    asyncio.run(_recreate_database(settings))
    asyncio.run(run_migrations(settings))
    yield settings


@pytest.fixture
async def pg(migrated: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated.pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(settings.redis_url)
    try:
        await client.ping()
    except Exception as e:
        pytest.fail(f"Redis at {settings.redis_url} is not reachable ({e}); run `nadi services up`")
    try:
        yield client
    finally:
        await client.aclose()
