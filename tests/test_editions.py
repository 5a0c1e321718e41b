"""The two TimescaleDB editions the tests run on: what each cluster can do (plain SQL, no
migrations), that the TSL build left the system's Apache edition alone and is reused from the
cache, and how the test run treats a missing TimescaleDB source."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from infra.paths import Paths
from infra.timescale_edition import cache_dir, ensure_built, source_sha256
from infra.timescaledb import pg_major
from nadi.settings import Settings
from tests.editions import APACHE, EDITIONS, TIMESCALE, edition_of, on_edition

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=EDITIONS)
async def probe(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """(edition, connection to a throw-away database with the extension on its cluster)."""
    s = on_edition(settings, request.param)
    name = f"{s.pg_database}_edition_probe"
    admin = await asyncpg.connect(s.pg_dsn.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(s.pg_dsn.rsplit("/", 1)[0] + f"/{name}")
    await conn.execute("CREATE EXTENSION timescaledb")
    await conn.execute(
        "CREATE TABLE m (ts timestamptz NOT NULL, token int NOT NULL, price float8);"
        "SELECT create_hypertable('m', 'ts', chunk_time_interval => interval '1 day');"
        "INSERT INTO m SELECT g, 1, 100 + extract(minute FROM g) FROM generate_series("
        "  '2026-01-05 03:45+00'::timestamptz, '2026-01-08 10:00+00', interval '1 minute') g"
    )
    try:
        yield request.param, conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_each_cluster_has_its_license_and_features(
    probe: tuple[str, asyncpg.Connection],
) -> None:
    """Apache: hypertables, no continuous aggregates. Timescale: aggregates and compression."""
    edition, conn = probe
    assert await conn.fetchval("SHOW timescaledb.license") == edition
    cagg = (
        "CREATE MATERIALIZED VIEW m_1h WITH (timescaledb.continuous) AS "
        "SELECT time_bucket('1 hour', ts) AS bucket, token, max(price) AS high, count(*) AS n "
        "FROM m GROUP BY 1, 2 WITH NO DATA"
    )
    if edition == APACHE:
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="apache"):
            await conn.execute(cagg)
        return
    await conn.execute(cagg)
    await conn.execute("CALL refresh_continuous_aggregate('m_1h', NULL, NULL)")
    assert await conn.fetchval("SELECT sum(n) FROM m_1h") == await conn.fetchval(
        "SELECT count(*) FROM m"
    )
    await conn.execute(
        "ALTER TABLE m SET (timescaledb.compress, timescaledb.compress_segmentby = 'token')"
    )
    compressed = await conn.fetchval(
        "SELECT count(compress_chunk(c)) "
        "FROM show_chunks('m', older_than => '2026-01-07'::timestamptz) c"
    )
    assert compressed == 2
    assert await conn.fetchval("SELECT count(*) FROM m") == 3 * 1440 + 375 + 1


def test_editions_fixture_follows_the_marker_and_settings(settings: Settings) -> None:
    tsl = on_edition(settings, TIMESCALE)
    assert tsl.pg_port == settings.pg_tsl_port and tsl.pg_database == settings.pg_database
    assert (edition_of(settings), edition_of(tsl)) == (APACHE, TIMESCALE)
    assert on_edition(settings, APACHE) is settings


@pytest.mark.timescale_edition
def test_tsl_build_is_cached_and_leaves_the_system_alone(settings: Settings) -> None:
    paths = Paths.from_settings(settings)
    major = pg_major()
    build = ensure_built(paths, settings.timescale_src, major)  # built by `services up`
    ready = build.prefix.parent / "ready"
    stamps = [(p, p.stat().st_mtime_ns) for p in (ready, *build.pkglibdir.glob("timescaledb*"))]
    assert ensure_built(paths, settings.timescale_src, major) == build
    assert [(p, p.stat().st_mtime_ns) for p, _ in stamps] == stamps, "a cached build was redone"
    assert build.prefix.parent == cache_dir(paths, source_sha256(settings.timescale_src), major)
    assert list(build.pkglibdir.glob("timescaledb-tsl-*.so"))
    system_lib = Path(f"/usr/lib/postgresql/{major}/lib")
    assert not list(system_lib.glob("timescaledb-tsl-*")), "the TSL build touched the system"
    assert (Path(f"/usr/share/postgresql/{major}/extension") / "timescaledb.control").exists()


def test_tree_key_ignores_build_outputs_and_sees_edits(tmp_path: Path) -> None:
    tree = tmp_path / "timescaledb"
    (tree / "tsl").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(timescaledb)\n")
    (tree / "tsl" / "a.c").write_text("int a;\n")
    key = source_sha256(tree)
    (tree / "build").mkdir()
    (tree / "build" / "a.o").write_text("object")
    assert source_sha256(tree) == key
    (tree / "tsl" / "a.c").write_text("int b;\n")
    assert source_sha256(tree) != key


def _collect(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
         "tests/test_editions.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_missing_source_is_one_line_locally_and_an_error_in_ci(tmp_path: Path) -> None:
    env = {**os.environ, "NADI_TIMESCALE_SRC": str(tmp_path / "absent.tar.gz")}
    env.pop("CI", None)
    local = _collect(env)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "[timescale]" not in local.stdout and "[apache]" in local.stdout
    assert "test_tsl_build_is_cached" not in local.stdout  # marked timescale_edition
    said = [line for line in local.stdout.splitlines() if "not collected" in line]
    assert len(said) == 1 and str(tmp_path / "absent.tar.gz") in said[0]
    ci = _collect({**env, "CI": "true"})
    assert ci.returncode != 0 and "CI=true" in ci.stderr + ci.stdout
