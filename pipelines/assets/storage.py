"""Storage group: the ``ticks`` hypertable's schema and policies, and ``ticks`` itself.

``ticks`` is written by the MarketDataProcessor, not by Dagster: it is an external asset
partitioned by trading day, there so the graph shows what candles, repairs, reconciliations and
replays read (replays record observations of the partitions they read).
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from datetime import timedelta
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from nadi.db.migrate import run_migrations, timescaledb_license
from nadi.settings import get_settings
from pipelines.partitions import trading_days
from pipelines.resources import RedisResource, TimescaleResource, candle_mode, run_async

GROUP = "storage"


class TicksPolicyConfig(Config):
    """The hypertable's policies (editable in the launchpad)."""

    chunk_interval_hours: int = Field(
        1, ge=1, le=24 * 7, description="time range of new chunks (existing ones keep theirs)"
    )
    retention_days: int = Field(
        0, ge=0, description="drop chunks older than this many days; 0 keeps all history"
    )
    compress_after_days: int = Field(
        7, ge=1, description="Timescale license only: compress chunks older than this"
    )
    analyze_recent_hours: int = Field(
        48, ge=1, description="ANALYZE the chunks of the last N hours"
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


async def _maintain(db: TimescaleResource, cfg: TicksPolicyConfig) -> dict[str, Any]:
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
        # Owner-only operations run through 0013's SECURITY DEFINER functions (role nadi_maint).
        await conn.execute(
            "SELECT nadi_maint_set_chunk_interval('ticks', $1::interval)",
            timedelta(hours=cfg.chunk_interval_hours),
        )
        timings["chunk_interval_ms"] = _ms(t)

        # Retention. Policies (background jobs) are a Timescale-license feature; on the Apache
        # edition this asset is the policy: drop_chunks() each time it materializes (daily).
        t = time.perf_counter()
        dropped = 0
        if license_ == "apache":
            if cfg.retention_days:
                dropped = len(
                    await conn.fetch(
                        "SELECT nadi_maint_drop_chunks('ticks', $1::interval)",
                        timedelta(days=cfg.retention_days),
                    )
                )
            out["retention"] = (
                f"drop_chunks older than {cfg.retention_days} d (run by this asset)"
                if cfg.retention_days
                else "keep all"
            )
        else:
            await conn.execute(
                "SELECT nadi_maint_set_retention('ticks', $1::interval)",
                timedelta(days=cfg.retention_days) if cfg.retention_days else None,
            )
            out["retention"] = (
                f"policy: {cfg.retention_days} d" if cfg.retention_days else "keep all"
            )
        out["chunks_dropped"] = dropped
        timings["retention_ms"] = _ms(t)

        # Compression: segment by instrument (every read is per instrument), order by time.
        # Chunks younger than the ingest age limit stay uncompressed so late ticks and repairs
        # insert into plain heap chunks.
        if license_ == "apache":
            out["compression"] = "unavailable (Apache edition)"
        else:
            await conn.execute(
                "SELECT nadi_maint_set_compression('ticks', $1::interval)",
                timedelta(days=cfg.compress_after_days),
            )
            out["compression"] = f"policy: after {cfg.compress_after_days} d"

        # What the Apache edition lacks and we do instead: continuous-aggregate refresh policies
        # (refresh every dirty rollup window except the one still filling).
        t = time.perf_counter()
        if mode == "rollup":
            out["stale_windows_refreshed"] = int(
                await conn.fetchval(
                    "SELECT nadi_refresh_candles('-infinity',"
                    " time_bucket(INTERVAL '5 minutes', now()))"
                )
            )
        timings["rollup_refresh_ms"] = _ms(t)

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
        # ANALYZE only: VACUUM is the owner's (and cannot run in a function); autovacuum is
        # tuned for candle_dirty's churn by 0013.
        for table in [*chunks, "candle_dirty", "sequence_gaps"]:
            await conn.execute("SELECT nadi_maint_analyze($1::regclass)", table)
        out["chunks_analyzed"] = len(chunks)
        timings["vacuum_analyze_ms"] = _ms(t)

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
    assert stats is not None
    out["stats"] = dict(stats)
    out["timings"] = timings
    return out


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
    description=(
        "The `ticks` hypertable and its policies. Materializing applies pending `dbt_or_sql/` "
        "migrations, sets the chunk interval, applies retention (a policy with the Timescale "
        "license; `drop_chunks` run here on the Apache edition) and compression (Timescale "
        "license only), refreshes stale candle rollup windows (what continuous-aggregate "
        "policies would do) and runs ANALYZE on recent chunks (as nadi_maint: autovacuum does the VACUUM). Safe to run any time."
    ),
)
def ticks_hypertable(
    context: AssetExecutionContext,
    config: TicksPolicyConfig,
    timescale: TimescaleResource,
    redis: RedisResource,
) -> MaterializeResult[None]:
    t0 = time.perf_counter()
    r = run_async(_maintain(timescale, config))
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
    return MaterializeResult(
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
            "retention": r["retention"],
            "compression": r["compression"],
            "chunks_dropped": MetadataValue.int(r["chunks_dropped"]),
            "chunks_analyzed": MetadataValue.int(r["chunks_analyzed"]),
            "stale_windows_refreshed": MetadataValue.int(int(r.get("stale_windows_refreshed", 0))),
            "dirty_windows_left": MetadataValue.int(int(st["dirty"])),
            "migrations_applied": MetadataValue.json(r["migrations_applied"]),
            "redis_used_memory": redis_mem,
            "timings_ms": MetadataValue.json(r["timings"]),
            "elapsed_ms": MetadataValue.float(_ms(t0)),
        }
    )


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
