"""Storage group: the ``ticks`` hypertable, its policies as assets, and ``ticks`` itself.

Dagster runs the storage policies on both editions instead of TimescaleDB's job scheduler
(whose background worker fails after doing the work on some builds, see issue 9):

* ``ticks_hypertable``: pending migrations, the chunk interval, TimescaleDB's own policy jobs
  (installed only with ``NADI_TIMESCALE_POLICIES=true`` and the Timescale license; otherwise
  removed, and TimescaleDB's built-in jobs paused), ANALYZE of recent chunks. Its check
  ``timescaledb_jobs_ok`` reports every scheduled TimescaleDB job whose last run failed.
* ``ticks_retention``: ``drop_chunks`` past the retention horizon (both editions).
* ``ticks_compression``: ``compress_chunk`` of chunks past the compression age (Timescale
  license; on the Apache edition it records that compression is unavailable).

Each materialization records its figures (chunks, rows, bytes, seconds). The candle refresh
policy is ``candle_refresh_policy`` in the aggregates group. All are retried by Dagster.

Dagster connects as nadi_maint (dbt_or_sql/0013_roles.sql), not as the owner: every step only
an owner may run on PostgreSQL 15 (chunk interval, drop_chunks, compression, ANALYZE,
TimescaleDB's policies on ``ticks`` and its built-in jobs) goes through a ``nadi_maint_*``
SECURITY DEFINER function owned by the owner, which checks its arguments. The continuous
aggregates are owned by nadi_maint itself (their refresh cannot run inside a function).
VACUUM cannot run inside a function either: autovacuum does it, tuned for the churn of
``candle_dirty`` by 0013.

``ticks`` is written by the MarketDataProcessor, not by Dagster: it is an external asset
partitioned by trading day, there so the graph shows what candles, repairs, reconciliations and
replays read (replays record observations of the partitions they read).
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import asyncpg
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    Backoff,
    Config,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)
from pydantic import Field

from nadi.db.candle_refresh import candle_mode
from nadi.db.migrate import run_migrations, timescaledb_license
from nadi.settings import get_settings
from pipelines.partitions import trading_days
from pipelines.resources import RedisResource, TimescaleResource, run_async

GROUP = "storage"
JOBS_CHECK = "timescaledb_jobs_ok"
# Transient failures (a lock timeout, a restarted server) are worth three more tries.
POLICY_RETRY = RetryPolicy(max_retries=3, delay=10, backoff=Backoff.EXPONENTIAL)


class TicksPolicyConfig(Config):
    """The hypertable's settings and TimescaleDB's policy jobs (editable in the launchpad)."""

    chunk_interval_hours: int = Field(
        1, ge=1, le=24 * 7, description="time range of new chunks (existing ones keep theirs)"
    )
    timescale_policies: bool | None = Field(
        None,
        description=(
            "install TimescaleDB's policy jobs (candle refresh, retention, compression) besides "
            "Dagster's; empty: NADI_TIMESCALE_POLICIES (default off)"
        ),
    )
    retention_days: int | None = Field(
        None, ge=0, description="for the retention policy job; empty: NADI_RETENTION_DAYS"
    )
    compress_after_days: int | None = Field(
        None, ge=1, description="for the compression policy job; empty: NADI_COMPRESS_AFTER_DAYS"
    )
    analyze_recent_hours: int = Field(
        48, ge=1, description="ANALYZE the chunks of the last N hours"
    )


class RetentionConfig(Config):
    retention_days: int | None = Field(
        None,
        ge=0,
        description="drop chunks older than this; 0 keeps all; empty: NADI_RETENTION_DAYS",
    )


class CompressionConfig(Config):
    compress_after_days: int | None = Field(
        None, ge=1, description="compress chunks older than this; empty: NADI_COMPRESS_AFTER_DAYS"
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


def _or_setting(value: int | bool | None, name: str) -> Any:
    return getattr(get_settings(), name) if value is None else value


async def _enable_compression(conn: asyncpg.Connection) -> None:
    """Segment by instrument (every read is per instrument), order by time then sequence (the
    settings are in 0013's nadi_maint_enable_compression; a no-op once enabled)."""
    await conn.execute("SELECT nadi_maint_enable_compression()")


async def _sync_timescale_policies(
    conn: asyncpg.Connection, on: bool, retention_days: int, compress_after_days: int
) -> dict[str, Any]:
    """Timescale license: TimescaleDB's policy jobs as configured; returns what is installed."""
    for view in ("candles_1m", "candles_5m"):
        await conn.execute(
            f"SELECT remove_continuous_aggregate_policy('{view}', if_exists => TRUE)"
        )
    # The policies on ticks need its owner: nadi_maint_* functions (NULL removes).
    await conn.execute("SELECT nadi_maint_set_retention('ticks', NULL)")
    await conn.execute("SELECT nadi_maint_set_compression('ticks', NULL)")
    installed: list[str] = []
    if on:
        # Late ticks older than 2 days are refreshed by Dagster (candle_refresh_policy).
        for view, end, every in (("candles_1m", "1 minute", "1 minute"),
                                 ("candles_5m", "5 minutes", "5 minutes")):  # fmt: skip
            await conn.execute(
                f"SELECT add_continuous_aggregate_policy('{view}', start_offset => INTERVAL "
                f"'2 days', end_offset => INTERVAL '{end}', schedule_interval => INTERVAL "
                f"'{every}')"
            )
            installed.append(f"refresh {view}")
        if retention_days:
            await conn.execute(
                "SELECT nadi_maint_set_retention('ticks', $1::interval)",
                timedelta(days=retention_days),
            )
            installed.append(f"retention {retention_days} d")
        await conn.execute(
            "SELECT nadi_maint_set_compression('ticks', $1::interval)",
            timedelta(days=compress_after_days),
        )
        installed.append(f"compression after {compress_after_days} d")
    # TimescaleDB's own jobs (job-history retention) run with the policies, or not at all.
    # They are not ours (their owner is the extension's): a nadi_maint_* function toggles them.
    toggled = int(await conn.fetchval("SELECT nadi_maint_schedule_builtin_jobs($1)", on))
    return {"installed": installed, "builtin_jobs_toggled": toggled}


_JOBS_SQL = """
SELECT j.job_id, j.application_name, j.proc_name, j.hypertable_name, j.scheduled,
       s.last_run_status, s.last_run_started_at, s.total_runs, s.total_failures,
       (SELECT e.err_message FROM timescaledb_information.job_errors e
        WHERE e.job_id = j.job_id ORDER BY e.start_time DESC LIMIT 1) AS last_error,
       (SELECT e.sqlerrcode FROM timescaledb_information.job_errors e
        WHERE e.job_id = j.job_id ORDER BY e.start_time DESC LIMIT 1) AS last_sqlstate
FROM timescaledb_information.jobs j
LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
ORDER BY j.job_id
"""


def jobs_check_result(license_: str, jobs: list[dict[str, Any]]) -> AssetCheckResult:
    """WARN when a scheduled TimescaleDB job's last run failed (its work may still be done:
    see issue 9; Dagster's own policy assets do not depend on it). On the Apache edition a
    built-in job refused by the license (SQLSTATE 0A000) is listed, not counted."""
    unsupported = [
        j for j in jobs
        if license_ == "apache" and j["last_run_status"] == "Failed"
        and j["last_sqlstate"] == "0A000"
    ]  # fmt: skip
    failing = [
        j for j in jobs
        if j["scheduled"] and j["last_run_status"] == "Failed" and j not in unsupported
    ]  # fmt: skip
    rows = "\n".join(
        f"| {j['job_id']} | {j['application_name']} | {j['scheduled']} | {j['last_run_status']}"
        f" | {j['total_runs']} | {j['total_failures']} | {(j['last_error'] or '')[:120]} |"
        for j in jobs
    )
    table = "| job | name | scheduled | last run | runs | failures | last error |\n"
    table += "|---|---|---|---|---|---|---|\n" + rows
    return AssetCheckResult(
        check_name=JOBS_CHECK,
        passed=not failing,
        severity=AssetCheckSeverity.WARN,
        description=(
            f"no scheduled TimescaleDB job failed ({len(jobs)} jobs)"
            if not failing
            else f"{len(failing)} TimescaleDB jobs failed: "
            + "; ".join(
                f"{j['application_name']} (job {j['job_id']}): {j['last_error']}" for j in failing
            )
        ),
        metadata={
            "jobs": MetadataValue.int(len(jobs)),
            "failing_jobs": MetadataValue.json([int(j["job_id"]) for j in failing]),
            "unsupported_by_license": MetadataValue.json([int(j["job_id"]) for j in unsupported]),
            "job_status": MetadataValue.md(table),
        },
    )


async def _maintain(
    db: TimescaleResource, cfg: TicksPolicyConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    timings: dict[str, float] = {}
    out: dict[str, Any] = {}
    t = time.perf_counter()
    out["migrations_applied"] = await run_migrations(db.settings(get_settings()))
    timings["migrate_ms"] = _ms(t)
    async with db.connect() as conn:
        license_ = await timescaledb_license(conn)
        mode = await candle_mode(conn)
        out["license"], out["candle_mode"] = license_, mode

        t = time.perf_counter()
        await conn.execute(
            "SELECT nadi_maint_set_chunk_interval('ticks', $1::interval)",
            timedelta(hours=cfg.chunk_interval_hours),
        )
        timings["chunk_interval_ms"] = _ms(t)

        t = time.perf_counter()
        on = bool(_or_setting(cfg.timescale_policies, "timescale_policies"))
        if license_ == "apache":
            out["timescale_policies"] = "unavailable (Apache edition): Dagster runs them"
        else:
            synced = await _sync_timescale_policies(
                conn,
                on,
                int(_or_setting(cfg.retention_days, "retention_days")),
                int(_or_setting(cfg.compress_after_days, "compress_after_days")),
            )
            out["timescale_policies"] = (
                ", ".join(synced["installed"]) if on else "off: Dagster runs them"
            )
        timings["policies_ms"] = _ms(t)

        # Fresh chunks get planner statistics now rather than when autovacuum notices them;
        # candle_dirty churns (insert per tick batch, delete per refresh) and bloats otherwise.
        t = time.perf_counter()
        chunks = [
            r[0]
            for r in await conn.fetch(
                "SELECT show_chunks('ticks', newer_than => now() - $1::interval)",
                timedelta(hours=cfg.analyze_recent_hours),
            )
        ]
        # ANALYZE only, as the owner: VACUUM cannot run in a function (autovacuum does it).
        for table in [*chunks, "candle_dirty", "sequence_gaps"]:
            await conn.execute("SELECT nadi_maint_analyze($1::regclass)", table)
        out["chunks_analyzed"] = len(chunks)
        timings["analyze_ms"] = _ms(t)

        stats = await conn.fetchrow(
            """SELECT approximate_row_count('ticks') AS rows,
                      (SELECT count(*) FROM show_chunks('ticks')) AS chunks,
                      hypertable_size('ticks') AS ticks_bytes,
                      hypertable_size('candles_1m') AS c1_bytes,
                      hypertable_size('candles_5m') AS c5_bytes,
                      (SELECT time_interval FROM timescaledb_information.dimensions
                        WHERE hypertable_name = 'ticks' LIMIT 1) AS chunk_interval,
                      (SELECT min(range_start) FROM timescaledb_information.chunks
                        WHERE hypertable_name = 'ticks') AS oldest,
                      (SELECT max(range_end) FROM timescaledb_information.chunks
                        WHERE hypertable_name = 'ticks') AS newest,
                      (SELECT count(*) FROM candle_dirty) AS dirty"""
        )
        jobs = [dict(r) for r in await conn.fetch(_JOBS_SQL)]
    assert stats is not None
    out["stats"] = dict(stats)
    out["timings"] = timings
    return out, jobs


def _size(n: int | None) -> str:
    v = float(n or 0)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if v < 1024 or unit == "TB":
            return f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TB"


async def _redis_memory(redis: RedisResource) -> str:
    async with redis.client() as r:
        info = await r.info("memory")
    return str(info.get("used_memory_human", "?"))


@asset(
    group_name=GROUP,
    kinds={"timescaledb", "sql"},
    retry_policy=POLICY_RETRY,
    check_specs=[
        AssetCheckSpec(
            JOBS_CHECK,
            asset="ticks_hypertable",
            description=(
                "TimescaleDB's background jobs (timescaledb_information.job_stats): warns when "
                "a scheduled job's last run failed, naming the job and its error."
            ),
        )
    ],
    description=(
        "The `ticks` hypertable. Materializing applies pending `dbt_or_sql/` migrations, sets "
        "the chunk interval, installs or removes TimescaleDB's policy jobs "
        "(`NADI_TIMESCALE_POLICIES`, off by default: Dagster's policy assets do the work) and "
        "runs ANALYZE on recent chunks (autovacuum does the VACUUM); its check reports "
        "TimescaleDB job failures. Runs as nadi_maint: owner-only steps go through the "
        "`nadi_maint_*` functions. Safe to run any time."
    ),
)
def ticks_hypertable(
    context: AssetExecutionContext,
    config: TicksPolicyConfig,
    timescale: TimescaleResource,
    redis: RedisResource,
) -> Iterator[MaterializeResult[None] | AssetCheckResult]:
    t0 = time.perf_counter()
    r, jobs = run_async(_maintain(timescale, config))
    st = r["stats"]
    try:
        redis_mem = run_async(_redis_memory(redis))
    except Exception as e:  # Redis is only reported on here: its absence must not fail upkeep
        context.log.warning(f"redis not reachable: {e}")
        redis_mem = "unreachable"
    table = "\n".join(
        [
            "| table | size |",
            "|---|---|",
            f"| ticks | {_size(st['ticks_bytes'])} |",
            f"| candles_1m | {_size(st['c1_bytes'])} |",
            f"| candles_5m | {_size(st['c5_bytes'])} |",
        ]
    )
    yield MaterializeResult(
        metadata={
            "rows (approx.)": MetadataValue.int(int(st["rows"] or 0)),
            "chunks": MetadataValue.int(int(st["chunks"] or 0)),
            "size_bytes": MetadataValue.int(int(st["ticks_bytes"] or 0)),
            "sizes": MetadataValue.md(table),
            "chunk_interval": str(st["chunk_interval"]),
            "oldest_chunk_start": str(st["oldest"]),
            "newest_chunk_end": str(st["newest"]),
            "license": r["license"],
            "candle_mode": r["candle_mode"],
            "timescale_policies": r["timescale_policies"],
            "chunks_analyzed": MetadataValue.int(r["chunks_analyzed"]),
            "dirty_windows": MetadataValue.int(int(st["dirty"])),
            "migrations_applied": MetadataValue.json(r["migrations_applied"]),
            "redis_used_memory": redis_mem,
            "timings_ms": MetadataValue.json(r["timings"]),
            "seconds": MetadataValue.float(round(_ms(t0) / 1000, 3)),
        }
    )
    yield jobs_check_result(r["license"], jobs)


ticks = AssetSpec(
    "ticks",
    deps=[ticks_hypertable],
    group_name=GROUP,
    partitions_def=trading_days,
    kinds={"timescaledb", "kafka"},
    description=(
        "Every valid tick, exactly once, written by the MarketDataProcessor from `ticks.raw` "
        "(not by Dagster). One partition per NSE trading day (the Asia/Kolkata date of "
        "`exchange_ts`); replays record which partitions they read as observations."
    ),
)


async def drop_old_chunks(conn: asyncpg.Connection, retention_days: int) -> dict[str, Any]:
    """Drop the chunks of ``ticks`` wholly older than ``retention_days``; 0 keeps all."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"retention_days": retention_days, "chunks_dropped": 0, "rows": 0}
    if retention_days:
        horizon = timedelta(days=retention_days)
        # Rows as the planner knows them (reltuples; exact counts would scan what is dropped).
        out["rows"] = int(
            await conn.fetchval(
                """SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
                   FROM show_chunks('ticks', older_than => now() - $1::interval) ch
                   JOIN pg_class c ON c.oid = ch""",
                horizon,
            )
        )
        dropped = await conn.fetch("SELECT nadi_maint_drop_chunks('ticks', $1::interval)", horizon)
        out["chunks_dropped"] = len(dropped)
    out["oldest_tick_chunk"] = str(
        await conn.fetchval(
            "SELECT min(range_start) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'ticks'"
        )
    )
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# The decorator of a policy asset (retention, compression, candle refresh): after ``ticks``,
# on TimescaleDB, retried like the other policies.
policy_asset = partial(asset, deps=[ticks], kinds={"timescaledb"}, retry_policy=POLICY_RETRY)


def run_policy(
    timescale: TimescaleResource,
    step: Callable[[asyncpg.Connection, int], Awaitable[dict[str, Any]]],
    days: int | None,
    setting: str,
) -> tuple[int, dict[str, Any]]:
    """``step(conn, days)`` on a maintenance connection, from a synchronous asset body;
    ``days`` None takes the setting of that name. Returns the days used and the step's result."""
    n = int(_or_setting(days, setting))

    async def go() -> dict[str, Any]:
        async with timescale.connect() as conn:
            return await step(conn, n)

    return n, run_async(go())


@policy_asset(
    group_name=GROUP,
    description=(
        "Retention of `ticks`: drops the chunks older than the horizon (`NADI_RETENTION_DAYS`, "
        "0 keeps all history) with `drop_chunks`, on both editions. Records chunks and rows "
        "(planner estimate) dropped and the seconds it took."
    ),
)
def ticks_retention(
    config: RetentionConfig, timescale: TimescaleResource
) -> MaterializeResult[None]:
    days, r = run_policy(timescale, drop_old_chunks, config.retention_days, "retention_days")
    return MaterializeResult(
        metadata={
            "retention": f"{days} d" if days else "keep all",
            "chunks_dropped": MetadataValue.int(r["chunks_dropped"]),
            "rows_dropped (approx.)": MetadataValue.int(r["rows"]),
            "oldest_chunk_start": r["oldest_tick_chunk"],
            "seconds": MetadataValue.float(r["seconds"]),
        }
    )


async def compress_old_chunks(conn: asyncpg.Connection, after_days: int) -> dict[str, Any]:
    """Timescale license: compress every uncompressed ``ticks`` chunk wholly older than
    ``after_days``. Younger chunks stay plain heap so late ticks and repairs insert cheaply."""
    t0 = time.perf_counter()
    license_ = await timescaledb_license(conn)
    out: dict[str, Any] = {"license": license_, "chunks_compressed": 0}
    if license_ == "apache":
        out["compression"] = "unavailable (Apache edition)"
    else:
        await _enable_compression(conn)
        chunks = [
            r[0]
            for r in await conn.fetch(
                """SELECT format('%I.%I', chunk_schema, chunk_name)
                   FROM timescaledb_information.chunks
                   WHERE hypertable_name = 'ticks' AND NOT is_compressed
                     AND range_end <= now() - $1::interval
                   ORDER BY range_start""",
                timedelta(days=after_days),
            )
        ]
        for chunk in chunks:
            await conn.execute("SELECT nadi_maint_compress_chunk($1::regclass)", chunk)
        out["chunks_compressed"] = len(chunks)
        out["compression"] = f"chunks older than {after_days} d"
        st = await conn.fetchrow(
            """SELECT count(*) AS n, coalesce(sum(before_compression_total_bytes), 0) AS before,
                      coalesce(sum(after_compression_total_bytes), 0) AS after
               FROM chunk_compression_stats('ticks') WHERE compression_status = 'Compressed'"""
        )
        assert st is not None
        out.update(
            compressed_chunks_total=int(st["n"]),
            bytes_before=int(st["before"]),
            bytes_after=int(st["after"]),
        )
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


@policy_asset(
    group_name=GROUP,
    description=(
        "Compression of `ticks` (Timescale license): compresses the chunks older than "
        "`NADI_COMPRESS_AFTER_DAYS`, segmented by instrument and ordered by "
        "(exchange_ts, sequence_id). Records chunks compressed, bytes before and after and the "
        "seconds it took; on the Apache edition it records that compression is unavailable."
    ),
)
def ticks_compression(
    config: CompressionConfig, timescale: TimescaleResource
) -> MaterializeResult[None]:
    _, r = run_policy(
        timescale, compress_old_chunks, config.compress_after_days, "compress_after_days"
    )
    md: dict[str, Any] = {
        "license": r["license"],
        "compression": r["compression"],
        "chunks_compressed": MetadataValue.int(r["chunks_compressed"]),
        "seconds": MetadataValue.float(r["seconds"]),
    }
    if "bytes_before" in r:
        md.update(
            compressed_chunks_total=MetadataValue.int(r["compressed_chunks_total"]),
            bytes_before=MetadataValue.int(r["bytes_before"]),
            bytes_after=MetadataValue.int(r["bytes_after"]),
        )
    return MaterializeResult(metadata=md)
