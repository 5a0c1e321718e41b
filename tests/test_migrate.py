"""The migration runner against real PostgreSQL: the repository's migrations on both editions
(twice: the second run applies nothing), checksums of applied files, and resuming a
no-transaction file that failed half way."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from nadi.db.migrate import MIGRATIONS, MigrationError, discover, plan, run_migrations
from nadi.settings import Settings
from tests.editions import EDITIONS, fresh_database, on_edition

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=EDITIONS)
async def empty_db(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Settings]:
    """A new, empty database on the edition's cluster."""
    s = on_edition(settings, request.param)
    yield await fresh_database(s, f"{s.pg_database}_migrate")


@pytest.fixture
async def toy_db(settings: Settings) -> Settings:
    """A new, empty database on the Apache cluster for toy migration directories."""
    return await fresh_database(settings, f"{settings.pg_database}_migrate_toy")


async def _fetch(s: Settings, sql: str) -> list[asyncpg.Record]:
    async with asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=1) as pool:
        return list(await pool.fetch(sql))


async def test_nadi_migrate_twice_on_each_edition(empty_db: Settings) -> None:
    s = empty_db
    first = await run_migrations(s)
    license_ = (await _fetch(s, "SELECT current_setting('timescaledb.license')"))[0][0]
    want = [m.version for m in plan(discover(MIGRATIONS), license_)]
    assert first == want
    recorded = await _fetch(s, "SELECT version, variant FROM schema_migrations ORDER BY 1")
    variants = {r["version"]: r["variant"] for r in recorded}
    assert (
        variants["0006"] == variants["0012"] == ("apache" if license_ == "apache" else "timescale")
    )
    mode = (await _fetch(s, "SELECT mode FROM candle_mode"))[0][0]
    assert mode == ("rollup" if license_ == "apache" else "continuous_aggregate")
    # The second run, through the CLI as a user runs it, applies nothing.
    env = {**s.env("pg_dsn"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "command", "migrate"], env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(out.stderr.strip().splitlines()[-1]) == {"applied": []}
    assert not await _fetch(s, "SELECT 1 FROM schema_migration_progress")


def _toy(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "migrations"
    d.mkdir(exist_ok=True)
    (d / "0001_timescaledb.sql").write_text("CREATE EXTENSION IF NOT EXISTS timescaledb;\n")
    for name, sql in files.items():
        (d / name).write_text(sql)
    return d


async def test_an_edited_applied_migration_is_refused_naming_it(
    toy_db: Settings, tmp_path: Path
) -> None:
    d = _toy(tmp_path, {"0002_a.sql": "CREATE TABLE a (x int);\n"})
    assert await run_migrations(toy_db, d) == ["0001", "0002"]
    (d / "0002_a.sql").write_text("CREATE TABLE a (x int, y int);\n")
    (d / "0003_b.sql").write_text("CREATE TABLE b (x int);\n")
    with pytest.raises(MigrationError, match=r"0002_a\.sql was edited after it was applied"):
        await run_migrations(toy_db, d)
    # Refused before anything else ran: 0003 is not applied.
    assert not await _fetch(toy_db, "SELECT 1 FROM pg_tables WHERE tablename = 'b'")
    (d / "0002_a.sql").write_text("CREATE TABLE a (x int);\n")
    assert await run_migrations(toy_db, d) == ["0003"]
    # A recorded file that disappeared is refused too.
    (d / "0003_b.sql").unlink()
    with pytest.raises(MigrationError, match=r"0003_b\.sql is recorded as applied"):
        await run_migrations(toy_db, d)


async def test_a_failed_transactional_migration_leaves_nothing(
    toy_db: Settings, tmp_path: Path
) -> None:
    d = _toy(tmp_path, {"0002_a.sql": "CREATE TABLE a (x int);\nINSERT INTO nowhere VALUES (1);\n"})
    with pytest.raises(MigrationError, match=r"0002_a\.sql failed \(rolled back\)"):
        await run_migrations(toy_db, d)
    assert not await _fetch(toy_db, "SELECT 1 FROM pg_tables WHERE tablename = 'a'")
    assert [r[0] for r in await _fetch(toy_db, "SELECT version FROM schema_migrations")] == ["0001"]


async def test_a_failed_no_transaction_migration_resumes_where_it_stopped(
    toy_db: Settings, tmp_path: Path
) -> None:
    body = (
        "-- nadi: no-transaction\n"
        "CREATE TABLE IF NOT EXISTS a (x int);\n"
        # Not idempotent on purpose: it must run exactly once across the two runs.
        "INSERT INTO a VALUES (1);\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$\n  SELECT 1;\n$$;\n"
        "INSERT INTO b SELECT f();\n"
        "CREATE TABLE IF NOT EXISTS c (x int);\n"
    )
    d = _toy(tmp_path, {"0002_nt.sql": body})
    with pytest.raises(MigrationError, match=r"0002_nt\.sql, statement 4 of 5 failed"):
        await run_migrations(toy_db, d)
    progress = await _fetch(toy_db, "SELECT file, statements_done FROM schema_migration_progress")
    assert [tuple(r) for r in progress] == [("0002_nt.sql", 3)]
    assert [r[0] for r in await _fetch(toy_db, "SELECT version FROM schema_migrations")] == ["0001"]
    # Editing a statement that already ran is refused ...
    (d / "0002_nt.sql").write_text(body.replace("VALUES (1)", "VALUES (2)"))
    with pytest.raises(MigrationError, match=r"0002_nt\.sql is partly applied"):
        await run_migrations(toy_db, d)
    # ... fixing the environment (or the failed statement) and running again resumes.
    (d / "0002_nt.sql").write_text(body)
    await _fetch(toy_db, "CREATE TABLE b (x int)")
    assert await run_migrations(toy_db, d) == ["0002"]
    assert [r[0] for r in await _fetch(toy_db, "SELECT x FROM a")] == [1]
    assert [r[0] for r in await _fetch(toy_db, "SELECT x FROM b")] == [1]
    assert await _fetch(toy_db, "SELECT 1 FROM pg_tables WHERE tablename = 'c'")
    assert not await _fetch(toy_db, "SELECT 1 FROM schema_migration_progress")
    assert await run_migrations(toy_db, d) == []
