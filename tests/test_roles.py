"""Least-privilege roles of dbt_or_sql/0013_roles.sql, against the real database.

* The matrix: every table, view, sequence and function of schema public (TimescaleDB's own
  excepted) with what each role may do, compared with :data:`TABLES` / :data:`FUNCTIONS`. A
  migration that adds an object without deciding who may touch it fails here.
* Behaviour: as ``nadi_api`` nothing can be written, created, altered or dropped; as
  ``nadi_ingest`` the tick writer works and nothing can be dropped, altered or truncated; as
  ``nadi_maint`` the owner-only operations work only through the ``nadi_maint_*`` functions,
  and only within their bounds.

Every test runs on both TimescaleDB editions: the Timescale edition has real continuous
aggregates (owned by nadi_maint), compression and policies; the Apache one the rollup tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from nadi.db.tick_writer import init_connection, write_batch
from nadi.sequence import Gap
from nadi.settings import Settings
from nadi.tick import Tick
from tests.feedgen import Feed
from tests.kafka_util import produce, wait_caught_up
from tests.processor_util import private_settings, reset_state, running_worker, stored

pytestmark = pytest.mark.both_editions

ROLES = ("nadi_ingest", "nadi_api", "nadi_maint")
TABLE_PRIVS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
R, RW, RWD = "SELECT", "SELECT INSERT UPDATE", "SELECT INSERT UPDATE DELETE"
ALL = " ".join(TABLE_PRIVS)

# table or view -> (nadi_ingest, nadi_api, nadi_maint) privileges, space-separated.
TABLES: dict[str, tuple[str, str, str]] = {
    "ticks": ("SELECT INSERT", R, "SELECT INSERT"),
    "sequence_gaps": (RW, R, RW),
    "candle_dirty": (RW, R, RWD),
    "candle_mode": (R, R, R),
    "instruments": (R, R, RW),  # maint loads the instrument master
    "nadi_instance": (R, R, R),
    "ingest_state": (RW, "", RW),
    "eod_reconciliation": ("", R, RWD),
    "schema_migrations": ("", "", R),
    "feed_sequences": (RW, "", R),  # 0016: the Kite adapter's sequence state
    "feed_outages": (RW, R, RW),
    "schema_migration_progress": ("", "", ""),  # the runner's, as the owner only
    # Apache edition: rollup hypertables the refresh writes; Timescale license: continuous
    # aggregates owned by nadi_maint (see CAGG_TABLES).
    "candles_1m": ("", R, RWD),
    "candles_5m": ("", R, RWD),
}
CAGG_TABLES = {"candles_1m", "candles_5m"}
SEQUENCES: dict[str, tuple[str, str, str]] = {
    "sequence_gaps_id_seq": ("USAGE", "", "USAGE"),
    "feed_outages_id_seq": ("USAGE", "", "USAGE"),
}
# function name -> roles with EXECUTE (PUBLIC has none on ours).
FUNCTIONS: dict[str, set[str]] = {
    "nadi_ingest_staged": {"nadi_ingest", "nadi_maint"},
    "nadi_refresh_candles": {"nadi_maint"},
    "nadi_maint_check_hypertable": set(),
    "nadi_maint_set_chunk_interval": {"nadi_maint"},
    "nadi_maint_drop_chunks": {"nadi_maint"},
    "nadi_maint_analyze": {"nadi_maint"},
    "nadi_maint_set_retention": {"nadi_maint"},
    "nadi_maint_set_compression": {"nadi_maint"},
    "nadi_maint_enable_compression": {"nadi_maint"},
    "nadi_maint_compress_chunk": {"nadi_maint"},
    "nadi_maint_schedule_builtin_jobs": {"nadi_maint"},
    # the one candle definition (0011)
    "nadi_candles": {"nadi_api", "nadi_maint"},
    "nadi_candle_aggregates": {"nadi_api", "nadi_maint"},
    "nadi_candle_rollup_aggregates": {"nadi_api", "nadi_maint"},
    "nadi_candle_dirty_stamp": {"nadi_ingest", "nadi_maint"},
    "nadi_forget_refreshed_marks": {"nadi_maint"},
    # history import (0017): whole instrument-days replaced, --replace-day
    "nadi_maint_replace_days": {"nadi_maint"},
}
SECURITY_DEFINER = {n for n in FUNCTIONS if n.startswith("nadi_maint_")}

_OBJECTS = """
SELECT c.relname, c.relkind::text AS relkind, pg_get_userbyid(c.relowner) AS owner
FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
"""
_FUNCTIONS = """
SELECT p.oid::regprocedure::text AS sig, p.proname, p.prosecdef, p.proconfig,
       pg_get_userbyid(p.proowner) AS owner,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec
FROM pg_proc p
WHERE p.pronamespace = 'public'::regnamespace
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                  AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY 1
"""


def _as(settings: Settings, role: str) -> str:
    return {
        "nadi_ingest": settings.ingest_dsn,
        "nadi_api": settings.api_dsn,
        "nadi_maint": settings.maint_dsn,
    }[role]


@pytest.fixture
async def role_conn(migrated: Settings) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    conns = {r: await asyncpg.connect(_as(migrated, r)) for r in ROLES}
    try:
        yield conns
    finally:
        for c in conns.values():
            await c.close()


async def test_roles_are_plain_logins(pg: asyncpg.Connection) -> None:
    rows = await pg.fetch(
        """SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls,
                  rolcanlogin FROM pg_roles WHERE rolname = ANY($1::text[]) ORDER BY 1""",
        list(ROLES),
    )
    got = {r["rolname"]: tuple(r.values())[1:] for r in rows}
    plain = (False, False, False, False, False)
    assert got == {
        "nadi_api": (*plain, True),
        "nadi_ingest": (*plain, True),
        "nadi_maint": (*plain, True),
    }


async def test_every_object_has_a_decision(pg: asyncpg.Connection) -> None:
    """The matrix: privileges of each role on every table, view and sequence of public."""
    owner = await pg.fetchval("SELECT current_user")
    undecided, wrong = [], []
    for obj in await pg.fetch(_OBJECTS):
        name, kind = obj["relname"], obj["relkind"]
        if kind == "S":
            privs: tuple[str, ...] = ("USAGE", "SELECT", "UPDATE")
            expected = SEQUENCES.get(name)
            check = "has_sequence_privilege"
        else:
            privs = TABLE_PRIVS
            expected = TABLES.get(name)
            check = "has_table_privilege"
        if expected is None:
            undecided.append(f"{name} ({kind})")
            continue
        is_cagg = name in CAGG_TABLES and kind == "v"
        if is_cagg:
            # Owned by nadi_maint (it refreshes them; their policy jobs run as it).
            assert obj["owner"] == "nadi_maint", name
            expected = (expected[0], expected[1], ALL)
        else:
            assert obj["owner"] == owner, f"{name} is owned by {obj['owner']}, not {owner}"
        for role, want in zip(ROLES, expected, strict=True):
            have = {
                p
                for p in privs
                if await pg.fetchval(f"SELECT {check}($1, $2, $3)", role, f"public.{name}", p)
            }
            if have != set(want.split()):
                wrong.append(f"{role} on {name}: has {sorted(have)}, expected {want.split()}")
    assert not undecided, (
        "objects without a grant decision (add them to 0013's successor and to TABLES): "
        + ", ".join(undecided)
    )
    assert not wrong, "\n".join(wrong)


async def test_every_function_has_a_decision(pg: asyncpg.Connection) -> None:
    owner = await pg.fetchval("SELECT current_user")
    undecided, wrong = [], []
    for f in await pg.fetch(_FUNCTIONS):
        name, sig = f["proname"], f["sig"]
        if name not in FUNCTIONS:
            undecided.append(sig)
            continue
        assert f["owner"] == owner, sig
        if f["public_exec"]:
            wrong.append(f"PUBLIC may execute {sig}")
        for role in ROLES:
            may = await pg.fetchval("SELECT has_function_privilege($1, $2, 'EXECUTE')", role, sig)
            if may != (role in FUNCTIONS[name]):
                wrong.append(f"{role} {'may' if may else 'may not'} execute {sig}")
        if f["prosecdef"] != (name in SECURITY_DEFINER):
            wrong.append(f"{sig}: SECURITY DEFINER is {f['prosecdef']}")
        if f["prosecdef"]:
            config = f["proconfig"] or []
            if "search_path=pg_catalog, public, pg_temp" not in config:
                wrong.append(f"{sig}: SECURITY DEFINER without a fixed search_path ({config})")
    assert not undecided, "functions without an EXECUTE decision: " + ", ".join(undecided)
    assert not wrong, "\n".join(wrong)


async def _denied(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    """Run ``sql``; it must fail for lack of privilege (or a read-only transaction)."""
    with pytest.raises(
        (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
    ) as e:
        await conn.execute(sql, *args)
    return type(e.value).__name__


_DESTRUCTIVE = (
    "DROP TABLE {t}",
    "TRUNCATE {t}",
    "ALTER TABLE {t} ADD COLUMN x int",
    "ALTER TABLE {t} OWNER TO {role}",
    "CREATE INDEX ON {t} ((1))",
)
# Continuous aggregates are views (relkind 'v') to PostgreSQL: their own DDL.
_DESTRUCTIVE_VIEW = (
    "DROP MATERIALIZED VIEW {t}",
    "ALTER MATERIALIZED VIEW {t} OWNER TO {role}",
    "ALTER MATERIALIZED VIEW {t} RENAME TO evil",
    "ALTER MATERIALIZED VIEW {t} SET (timescaledb.materialized_only = false)",
    "CALL refresh_continuous_aggregate('{t}', NULL, NULL)",
)
_WRITES = ("INSERT INTO {t} DEFAULT VALUES", "UPDATE {t} SET {col} = {col}", "DELETE FROM {t}")


async def _tables(pg: asyncpg.Connection) -> list[tuple[str, str, tuple[str, ...]]]:
    """(table, first column, destructive statements) for every table and view of public, and
    the materialization hypertables behind continuous aggregates (Timescale edition)."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for r in await pg.fetch(
        """SELECT format('%I.%I', n.nspname, c.relname), (SELECT attname FROM pg_attribute
                                  WHERE attrelid = c.oid AND attnum = 1), c.relkind::text,
                  EXISTS (SELECT 1 FROM _timescaledb_catalog.continuous_agg a
                          JOIN _timescaledb_catalog.hypertable h
                            ON h.id IN (a.raw_hypertable_id, a.mat_hypertable_id)
                          WHERE format('%I.%I', h.schema_name, h.table_name)::regclass = c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE ((n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm'))
                      OR c.oid IN (SELECT format('%I.%I', h.schema_name, h.table_name)::regclass
                                   FROM _timescaledb_catalog.continuous_agg a
                                   JOIN _timescaledb_catalog.hypertable h
                                     ON h.id = a.mat_hypertable_id))
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                 AND d.objid = c.oid AND d.deptype = 'e')
               ORDER BY 1"""
    ):
        tpls: tuple[str, ...] = _DESTRUCTIVE_VIEW if r[2] == "v" else _DESTRUCTIVE
        if r[3]:
            # TimescaleDB refuses TRUNCATE of a hypertable under or behind a continuous
            # aggregate to everyone, before any privilege check; the matrix shows no role
            # may TRUNCATE it.
            tpls = tuple(t for t in tpls if not t.startswith("TRUNCATE"))
        out.append((r[0], r[1], tpls))
    return out


async def test_api_role_cannot_write_or_drop_anything(
    pg: asyncpg.Connection, role_conn: dict[str, asyncpg.Connection]
) -> None:
    api = role_conn["nadi_api"]
    assert await api.fetchval("SHOW default_transaction_read_only") == "on"
    tables = await _tables(pg)
    assert len(tables) >= 9
    for read_only in (True, False):
        # First as the API connects (read-only transactions), then with that switched off:
        # the grants alone must refuse it too.
        await api.execute(f"SET default_transaction_read_only = {'on' if read_only else 'off'}")
        for t, col, destructive in tables:
            for tpl in destructive + _WRITES:
                why = await _denied(api, tpl.format(t=t, col=col, role="nadi_api"))
                if not read_only:
                    assert why == "InsufficientPrivilegeError", (tpl, t)
        for sql in (
            "CREATE TABLE public.evil (x int)",
            "CREATE FUNCTION public.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "SELECT nadi_refresh_candles('-infinity', 'infinity')",
            "SELECT drop_chunks('ticks', older_than => now())",
            "SELECT nadi_maint_drop_chunks('ticks', INTERVAL '1 day')",
            "SELECT nadi_maint_set_chunk_interval('ticks', INTERVAL '1 hour')",
            "SELECT set_chunk_time_interval('ticks', INTERVAL '1 hour')",
        ):
            await _denied(api, sql)
    # What it is for still works.
    assert await api.fetchval("SELECT count(*) FROM ticks") >= 0
    assert await api.fetchval("SELECT mode FROM candle_mode") in ("rollup", "continuous_aggregate")


def _tick(token: int, seq: int, ts: datetime) -> Tick:
    ns = int((ts - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e6) * 1000
    return Tick(token, seq, ns, 100.0 + seq, last_qty=1, feed="A")


async def test_ingest_role_writes_ticks_and_cannot_drop_or_alter(
    pg: asyncpg.Connection, role_conn: dict[str, asyncpg.Connection]
) -> None:
    ingest = role_conn["nadi_ingest"]
    # The worker's path: session staging tables, COPY, nadi_ingest_staged; a gap and a mark.
    await init_connection(ingest)
    mode = await ingest.fetchval("SELECT mode FROM candle_mode")
    assert await ingest.fetchval("SELECT count(*) FROM instruments") >= 0
    token, now = 990_001, datetime.now(UTC).replace(microsecond=0)
    ticks = [_tick(token, 1, now), _tick(token, 5, now + timedelta(seconds=1))]
    day = ticks[0].trading_day_ordinal
    res = await write_batch(
        ingest,
        ticks,
        [t.trading_day_ordinal for t in ticks],
        ["OK", "STALE"],
        [Gap(token, day, 2, 4)],
        mark_dirty=True,
    )
    assert (res.inserted, res.stale, res.gaps_new) == (2, 1, 1), (res, mode)
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE instrument_token = $1", token) == 2
    assert (
        await pg.fetchval("SELECT count(*) FROM candle_dirty WHERE instrument_token = $1", token)
        == 1
    )
    # Nothing destructive, on any table; no new objects; no deletes of history or gaps.
    for t, col, destructive in await _tables(pg):
        for tpl in destructive:
            assert await _denied(ingest, tpl.format(t=t, col=col, role="nadi_ingest")) == (
                "InsufficientPrivilegeError"
            ), (tpl, t)
    for sql in (
        "DELETE FROM ticks",
        "UPDATE ticks SET last_price = 1",
        "DELETE FROM sequence_gaps",
        "DELETE FROM candle_dirty",
        "UPDATE candle_mode SET mode = 'rollup'",
        "INSERT INTO instruments (instrument_token, tradingsymbol) VALUES (1, 'X')",
        "DELETE FROM candles_1m",
        "DELETE FROM eod_reconciliation",
        "CREATE TABLE public.evil (x int)",
        "SELECT drop_chunks('ticks', older_than => now())",
        "SELECT nadi_maint_drop_chunks('ticks', INTERVAL '1 day')",
        "SELECT nadi_refresh_candles('-infinity', 'infinity')",
    ):
        await _denied(ingest, sql)


async def test_maint_role_runs_owner_operations_only_through_its_functions(
    pg: asyncpg.Connection, role_conn: dict[str, asyncpg.Connection]
) -> None:
    maint = role_conn["nadi_maint"]
    token = 990_002
    old = datetime.now(UTC) - timedelta(days=40)
    await pg.execute(
        """INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price)
           VALUES ($1, $2, 1, 10), ($1, now(), 1, 10)""",
        token,
        old,
    )
    # Direct owner-only calls are refused...
    for sql in (
        "SELECT drop_chunks('ticks', older_than => now() - INTERVAL '30 days')",
        "SELECT set_chunk_time_interval('ticks', INTERVAL '1 hour')",
        "DROP TABLE ticks",
        "TRUNCATE ticks",
        "DELETE FROM ticks",
        "ALTER TABLE ticks ADD COLUMN x int",
        "CREATE TABLE public.evil (x int)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await maint.execute(sql)
    # ... the functions do them, within bounds.
    dropped = await maint.fetch("SELECT nadi_maint_drop_chunks('ticks', INTERVAL '30 days') AS c")
    assert len(dropped) == 1 and "_hyper_" in dropped[0]["c"]
    assert [r[0] for r in await pg.fetch(
        "SELECT exchange_ts > now() - INTERVAL '1 day' FROM ticks WHERE instrument_token = $1",
        token,
    )] == [True]  # fmt: skip
    with pytest.raises(asyncpg.RaiseError, match="below one day"):
        await maint.execute("SELECT nadi_maint_drop_chunks('ticks', INTERVAL '1 hour')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a hypertable"):
        await maint.execute("SELECT nadi_maint_drop_chunks('pg_class', INTERVAL '30 days')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a hypertable"):
        await maint.execute("SELECT nadi_maint_set_chunk_interval('instruments', '1 hour')")

    before = await pg.fetchval(
        "SELECT time_interval FROM timescaledb_information.dimensions"
        " WHERE hypertable_name = 'ticks'"
    )
    await maint.execute("SELECT nadi_maint_set_chunk_interval('ticks', INTERVAL '2 hours')")
    assert await pg.fetchval(
        "SELECT time_interval FROM timescaledb_information.dimensions"
        " WHERE hypertable_name = 'ticks'"
    ) == timedelta(hours=2)
    await maint.execute("SELECT nadi_maint_set_chunk_interval('ticks', $1::interval)", before)

    # A chunk of this test's own, never analyzed: today's chunks hold other tests' rows, and
    # autovacuum analyzes any of them once enough rows land (a shared chunk read 672, not -1).
    # Far in the future so nothing else reads it; dropped again so no other test sees it.
    far = datetime(2099, 6, 1, tzinfo=UTC)
    await pg.execute("SELECT drop_chunks('ticks', newer_than => $1::timestamptz)", far)
    await pg.execute(
        "INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price)"
        " VALUES ($1, $2, 1, 10)",
        token,
        far,
    )
    try:
        chunk = await pg.fetchval(
            "SELECT tableoid::regclass::text FROM ticks WHERE exchange_ts = $1", far
        )
        # ANALYZE itself only warns and skips for a non-owner; the function analyzes
        # (reltuples goes from -1, never analyzed, to the row count).
        await maint.execute(f"ANALYZE {chunk}")
        reltuples = "SELECT reltuples FROM pg_class WHERE oid = $1::regclass"
        assert await pg.fetchval(reltuples, chunk) == -1
        await maint.execute("SELECT nadi_maint_analyze($1::regclass)", chunk)
        assert await pg.fetchval(reltuples, chunk) >= 1
    finally:
        await pg.execute("SELECT drop_chunks('ticks', newer_than => $1::timestamptz)", far)
    await maint.execute("SELECT nadi_maint_analyze('candle_dirty')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a table of schema public"):
        await maint.execute("SELECT nadi_maint_analyze('pg_catalog.pg_authid')")
    # Derived data it refreshes (Apache edition: rollup tables).
    if await maint.fetchval("SELECT mode FROM candle_mode") == "rollup":
        await maint.execute("SELECT nadi_refresh_candles('-infinity', 'infinity')")


@pytest.mark.timescale_edition
async def test_maint_role_runs_the_timescale_policies(
    pg: asyncpg.Connection, role_conn: dict[str, asyncpg.Connection]
) -> None:
    """Timescale license: aggregate refreshes and their policies as the aggregates' owner;
    compression, retention policy and TimescaleDB's own jobs only through nadi_maint_*."""
    maint = role_conn["nadi_maint"]
    token = 990_004
    await pg.execute(
        """INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price)
           VALUES ($1, now() - INTERVAL '20 days', 1, 10), ($1, now(), 1, 11)""",
        token,
    )
    old, young = [
        r[0]
        for r in await pg.fetch(
            """SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks
               WHERE hypertable_name = 'ticks' AND (range_end < now() - INTERVAL '10 days'
                                                    OR range_end > now())
               ORDER BY range_start"""
        )
    ][-2:]
    for sql in (
        f"SELECT compress_chunk('{old}')",
        "ALTER TABLE ticks SET (timescaledb.compress)",
        "SELECT add_retention_policy('ticks', INTERVAL '30 days')",
        "SELECT alter_job(3, scheduled => false)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await maint.execute(sql)
    for view in ("candles_1m", "candles_5m"):
        await maint.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")
        await maint.execute(
            f"SELECT add_continuous_aggregate_policy('{view}', start_offset => INTERVAL '2 days',"
            " end_offset => INTERVAL '5 minutes', schedule_interval => INTERVAL '5 minutes')"
        )
    assert (
        await pg.fetchval("SELECT count(*) FROM candles_1m WHERE instrument_token = $1", token) == 2
    )
    await maint.execute("SELECT nadi_maint_set_retention('ticks', INTERVAL '30 days')")
    await maint.execute("SELECT nadi_maint_set_compression('ticks', INTERVAL '3 days')")
    jobs = "SELECT proc_name, owner::text FROM timescaledb_information.jobs WHERE job_id >= 1000"
    assert sorted(tuple(r) for r in await pg.fetch(jobs)) == [
        ("policy_compression", await pg.fetchval("SELECT current_user")),
        ("policy_refresh_continuous_aggregate", "nadi_maint"),
        ("policy_refresh_continuous_aggregate", "nadi_maint"),
        ("policy_retention", await pg.fetchval("SELECT current_user")),
    ]
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a chunk of ticks"):
        await maint.execute("SELECT nadi_maint_compress_chunk($1::regclass)", young)
    await maint.execute("SELECT nadi_maint_compress_chunk($1::regclass)", old)
    assert await pg.fetchval(
        "SELECT is_compressed FROM timescaledb_information.chunks"
        " WHERE format('%I.%I', chunk_schema, chunk_name) = $1",
        old,
    )
    builtin = "SELECT bool_and(scheduled) FROM timescaledb_information.jobs WHERE job_id < 1000"
    was = await pg.fetchval(builtin)  # paused once ticks_hypertable ran with policies off
    assert await maint.fetchval("SELECT nadi_maint_schedule_builtin_jobs($1)", not was) >= 1
    assert await pg.fetchval(builtin) is (not was)
    await maint.execute("SELECT nadi_maint_schedule_builtin_jobs($1)", was)
    assert await pg.fetchval(builtin) is was
    # Leave the database as the migrations did: no policy jobs.
    for view in ("candles_1m", "candles_5m"):
        await maint.execute(f"SELECT remove_continuous_aggregate_policy('{view}')")
    await maint.execute("SELECT nadi_maint_set_retention('ticks', NULL)")
    await maint.execute("SELECT nadi_maint_set_compression('ticks', NULL)")
    assert await pg.fetch(jobs) == []


async def test_worker_ingests_as_nadi_ingest(migrated: Settings, pg: asyncpg.Connection) -> None:
    """The processor's pool is nadi_ingest's (NADI_PG_INGEST_DSN defaults to it), and the
    worker's whole path (state load, staging, nadi_ingest_staged, marks, ingest_state) works
    with that role's grants alone. The processor tests run the worker the same way, so a
    missing grant fails them too (their batches never commit and they do not catch up)."""
    env = await private_settings(migrated)
    assert env.ingest_dsn.startswith("postgresql://nadi_ingest@")
    await reset_state(pg, env)
    token = 990_003
    feed = Feed(tokens=[token], n=300)
    produce(env.kafka_bootstrap, env.topic_ticks, feed.messages())
    async with running_worker(env):
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks)
        users = {
            r[0]
            for r in await pg.fetch(
                """SELECT usename FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = 'nadi'"""
            )
        }
    assert users == {"nadi_ingest"}
    assert await stored(pg) == feed.unique
    assert await pg.fetchval(
        "SELECT last_seq FROM ingest_state WHERE instrument_token = $1", token
    ) == max(seq for _, seq, _ in feed.unique)
