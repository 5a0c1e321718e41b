"""Shared fixtures. Integration tests use the real local services started by
`nadi services up --timescale-edition` (make test does that), in their own database, Redis db
and topics, so a running `make up` platform is not disturbed. A missing service fails the test
loudly.

Both TimescaleDB editions (tests/editions.py): unmarked tests run on the Apache cluster of
NADI_PG_DSN. A test marked ``both_editions``, or using ``edition_settings``/``edition_pg``,
runs once per available edition, its ``migrated`` and ``pg`` (and every fixture built on them)
on that edition's cluster; ``timescale_edition`` runs it on the Timescale edition only. Without
the TimescaleDB source those Timescale-edition items are not collected (one header line says
so), and under CI=true the run refuses to start.
"""

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
from tests.editions import APACHE, EDITIONS, TIMESCALE, edition_of, fresh_database, on_edition

_MARKERS = {
    "both_editions": "run on each TimescaleDB edition (apache, and timescale when built)",
    "timescale_edition": "run on the Timescale-licensed edition only",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    if TIMESCALE not in EDITIONS and os.environ.get("CI") == "true":
        raise pytest.UsageError(
            f"CI=true but the TimescaleDB source {Settings().timescale_src} is missing "
            "(NADI_TIMESCALE_SRC): the Timescale-edition tests cannot run"
        )


def pytest_report_header(config: pytest.Config) -> str:
    s = Settings()
    if TIMESCALE in EDITIONS:
        return f"editions: apache ({s.pg_port}), timescale ({s.pg_tsl_port})"
    return (
        f"editions: apache only; Timescale-edition tests not collected "
        f"(no TimescaleDB source at {s.timescale_src}, NADI_TIMESCALE_SRC)"
    )


def _wanted_editions(metafunc: pytest.Metafunc) -> tuple[str, ...] | None:
    if metafunc.definition.get_closest_marker("timescale_edition"):
        return (TIMESCALE,)  # deselected below when the edition is not available
    names = set(metafunc.fixturenames)
    if metafunc.definition.get_closest_marker("both_editions") or names & {
        "edition_settings",
        "edition_pg",
    }:
        return EDITIONS
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    editions = _wanted_editions(metafunc)
    if editions is None or "migrated" not in metafunc.fixturenames:
        return
    # The Apache param is None, the cache key of an unparametrized `migrated` too: marked and
    # unmarked tests then share one Apache database and the fixtures built on it.
    params = [None if e == APACHE else e for e in editions]
    metafunc.parametrize("migrated", params, indirect=True, scope="session", ids=list(editions))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TIMESCALE in EDITIONS:
        return
    keep = [i for i in items if not i.get_closest_marker("timescale_edition")]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


async def _recreate_database(s: Settings) -> None:
    try:
        await fresh_database(s)
    except (OSError, asyncpg.PostgresError) as e:
        cmd = "nadi services up" + (" --timescale-edition" if edition_of(s) == TIMESCALE else "")
        pytest.fail(f"PostgreSQL at {s.pg_host}:{s.pg_port} is not reachable ({e}); run `{cmd}`")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def migrated(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Settings]:
    """A freshly created, fully migrated test database on the Apache cluster, or on the
    edition's cluster for tests parametrized by edition (same database name on both)."""
    edition = getattr(request, "param", None) or APACHE
    s = on_edition(settings, edition)
    asyncio.run(_recreate_database(s))
    asyncio.run(run_migrations(s))
    yield s


@pytest.fixture(scope="session")
def edition_settings(migrated: Settings) -> Settings:
    """`migrated`, always parametrized over the available editions."""
    return migrated


@pytest.fixture
def edition(migrated: Settings) -> str:
    """``"apache"`` or ``"timescale"``: the edition this test's `migrated` database is on."""
    return edition_of(migrated)


@pytest.fixture
async def pg(migrated: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated.pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def edition_pg(pg: asyncpg.Connection) -> asyncpg.Connection:
    """`pg` on the edition of `edition_settings`."""
    return pg


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
