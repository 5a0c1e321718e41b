"""Aggregates group: ``candles_1m`` and ``candles_5m``, one partition per NSE trading day, and
``candle_refresh_policy``, the refresh of marked windows of any day.

One op materializes both tables: with the Apache edition ``nadi_refresh_candles`` recomputes
the 1m and the 5m rollups of a window together (5m is built from 1m), and with the Timescale
license the 5m continuous aggregate is hierarchical on the 1m one, so they are refreshed in
order. Both compute candles with the one definition of dbt_or_sql/0011.

Marks. The tick writer marks the 5-minute windows of every row it commits (``candle_dirty``)
on both editions, and the API serves marked windows from raw ticks. A refresh forgets only the
marks whose ticks it has seen: the rollup claims them in its own transaction, the continuous
aggregate refresh (which cannot run in one) forgets those its prior snapshot saw committed.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    BackfillPolicy,
    Config,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    multi_asset,
)
from pydantic import Field

from nadi.db.candle_refresh import candle_mode, refresh_aggregates, refresh_window
from nadi.times import day_bounds
from pipelines.assets.storage import policy_asset, ticks
from pipelines.checks import CandleCheckOutcome, candle_check_specs, check_candles_day
from pipelines.partitions import key_to_day, trading_days
from pipelines.resources import TimescaleResource, run_async

GROUP = "aggregates"
GAP_REPAIR_KEY = AssetKey("gap_repair")


class CandleRefreshConfig(Config):
    """How a candle materialization refreshes its day."""

    full: bool = Field(
        True,
        description=(
            "Recompute every window of the day (backfills, manual runs). False: only the windows "
            "marked dirty since the last refresh (the market-hours schedule and gap repairs)."
        ),
    )
    check_sample_instruments: int = Field(
        25, ge=1, description="instruments whose candles the check recomputes from raw ticks"
    )


async def refresh_day(conn: asyncpg.Connection, day: date, *, full: bool) -> dict[str, Any]:
    """Refresh both candle tables over ``day``'s window; returns operator figures."""
    start, end = day_bounds(day)
    mode = await candle_mode(conn)
    t0 = time.perf_counter()
    marked, windows = await refresh_window(conn, mode, start, end, full=full)
    refresh_ms = round((time.perf_counter() - t0) * 1000, 1)
    stats = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM candles_1m WHERE bucket >= $1 AND bucket < $2) AS c1,
                  (SELECT count(*) FROM candles_5m WHERE bucket >= $1 AND bucket < $2) AS c5,
                  (SELECT count(DISTINCT instrument_token) FROM candles_5m
                    WHERE bucket >= $1 AND bucket < $2) AS instruments,
                  (SELECT coalesce(sum(tick_count), 0) FROM candles_1m
                    WHERE bucket >= $1 AND bucket < $2) AS ticks,
                  (SELECT count(*) FROM candle_dirty WHERE bucket >= $1 AND bucket < $2) AS dirty""",
        start,
        end,
    )
    assert stats is not None
    return {
        "day": day.isoformat(),
        "mode": mode,
        "windows_marked": marked,
        "windows_refreshed": windows,
        "refresh_ms": refresh_ms,
        "refresh_seconds": round(refresh_ms / 1000, 3),
        **{k: int(v) for k, v in dict(stats).items()},
    }


async def _run(
    db: TimescaleResource, days: list[date], cfg: CandleRefreshConfig
) -> tuple[list[dict[str, Any]], CandleCheckOutcome, CandleCheckOutcome, float]:
    c1 = CandleCheckOutcome("candles_1m")
    c5 = CandleCheckOutcome("candles_5m")
    per_day: list[dict[str, Any]] = []
    async with db.connect() as conn:
        for d in days:
            per_day.append(await refresh_day(conn, d, full=cfg.full))
        t_check = time.perf_counter()
        for d in days:
            start, end = day_bounds(d)
            await check_candles_day(
                conn, "candles_1m", start, end, cfg.check_sample_instruments, c1
            )
            await check_candles_day(
                conn, "candles_5m", start, end, cfg.check_sample_instruments, c5
            )
        check_ms = round((time.perf_counter() - t_check) * 1000, 1)
    return per_day, c1, c5, check_ms


def _days_of(context: AssetExecutionContext) -> list[date]:
    # A backfill run may cover a range of partitions (see backfill_policy).
    return [key_to_day(k) for k in context.partition_keys]


@multi_asset(
    name="candles",
    specs=[
        AssetSpec(
            "candles_1m",
            deps=[ticks, GAP_REPAIR_KEY],
            group_name=GROUP,
            kinds={"timescaledb"},
            description=(
                "1-minute OHLCV candles per instrument (`volume` = sum of `last_qty`), one "
                "partition per NSE trading day. A materialization refreshes that day's window: "
                "the incremental rollup (`nadi_refresh_candles`) on the Apache edition, a "
                "continuous-aggregate refresh with the Timescale license. Kept fresh during "
                "market hours by `candles_intraday_schedule`; backfill any range of days."
            ),
        ),
        AssetSpec(
            "candles_5m",
            deps=["candles_1m"],
            group_name=GROUP,
            kinds={"timescaledb"},
            description="5-minute candles, rolled up from `candles_1m` in the same refresh.",
        ),
    ],
    check_specs=candle_check_specs,
    partitions_def=trading_days,
    # Up to ten days per run: a year-long backfill becomes ~25 runs, not 250.
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=10),
    op_tags={"nadi/kind": "candles"},
    # A refresh is idempotent: a retry after a lock timeout or a restarted server is safe.
    retry_policy=RetryPolicy(max_retries=2, delay=5),
)
def candles(
    context: AssetExecutionContext, config: CandleRefreshConfig, timescale: TimescaleResource
) -> Iterator[MaterializeResult[Any] | AssetCheckResult]:
    days = _days_of(context)
    per_day, c1, c5, check_ms = run_async(_run(timescale, days, config))
    total = {
        k: sum(int(d[k]) for d in per_day)
        for k in ("windows_marked", "windows_refreshed", "c1", "c5", "ticks")
    }
    common: dict[str, Any] = {
        "trading_days": MetadataValue.json([d["day"] for d in per_day]),
        "mode": per_day[0]["mode"] if per_day else "",
        "full_refresh": config.full,
        "windows_refreshed (instrument x 5 min)": MetadataValue.int(total["windows_refreshed"]),
        "windows_marked_for_backfill": MetadataValue.int(total["windows_marked"]),
        "refresh_ms": MetadataValue.float(sum(float(d["refresh_ms"]) for d in per_day)),
        "refresh_seconds": MetadataValue.float(
            round(sum(float(d["refresh_ms"]) for d in per_day) / 1000, 3)
        ),
        "check_ms": MetadataValue.float(check_ms),
        "instruments": MetadataValue.int(max((int(d["instruments"]) for d in per_day), default=0)),
        "dirty_windows_left": MetadataValue.int(sum(int(d["dirty"]) for d in per_day)),
    }
    context.log.info(f"candles refreshed: {per_day}")
    yield MaterializeResult(
        asset_key="candles_1m",
        metadata={
            **common,
            "rows": MetadataValue.int(total["c1"]),
            "ticks_aggregated": MetadataValue.int(total["ticks"]),
        },
    )
    yield MaterializeResult(
        asset_key="candles_5m", metadata={**common, "rows": MetadataValue.int(total["c5"])}
    )
    yield c1.result()
    yield c5.result()


_MARKED_DAYS = """
SELECT min(bucket) AS lo, max(bucket) + INTERVAL '5 minutes' AS hi, count(*) AS windows
FROM candle_dirty WHERE bucket < $1
GROUP BY (bucket AT TIME ZONE 'Asia/Kolkata')::date ORDER BY 1
"""


async def refresh_marked(conn: asyncpg.Connection, until: datetime) -> dict[str, Any]:
    """Refresh every marked window that starts before ``until``, whatever its day (late and
    repaired ticks, back-filled history): what a continuous-aggregate refresh policy does,
    run by Dagster on both editions. Returns operator figures."""
    mode = await candle_mode(conn)
    t0 = time.perf_counter()
    days = [dict(r) for r in await conn.fetch(_MARKED_DAYS, until)]
    if mode == "rollup":
        refreshed = int(await conn.fetchval("SELECT nadi_refresh_candles('-infinity', $1)", until))
    else:
        refreshed = 0
        for d in days:  # one refresh per IST day: its marks span at most that day
            refreshed += await refresh_aggregates(conn, d["lo"], d["hi"], force=False)
    left = int(await conn.fetchval("SELECT count(*) FROM candle_dirty"))
    return {
        "mode": mode,
        "days": [str((d["lo"] + timedelta(hours=5, minutes=30)).date()) for d in days],
        "windows_marked": sum(int(d["windows"]) for d in days),
        "windows_refreshed": refreshed,
        "windows_left": left,
        "seconds": round(time.perf_counter() - t0, 3),
    }


@policy_asset(
    group_name=GROUP,
    name="candle_refresh_policy",
    description=(
        "The candle refresh policy, run by Dagster on both editions: refreshes `candles_1m` and "
        "`candles_5m` over every window marked since its last refresh that started before the "
        "current one, on any day (late and repaired ticks, back-filled history). Until then "
        "`/v1/candles` serves those windows from raw ticks. Records days, windows and seconds."
    ),
)
def candle_refresh_policy(timescale: TimescaleResource) -> MaterializeResult[None]:
    async def go() -> dict[str, Any]:
        async with timescale.connect() as conn:
            until = await conn.fetchval("SELECT time_bucket(INTERVAL '5 minutes', now())")
            return await refresh_marked(conn, until)

    r = run_async(go())
    return MaterializeResult(
        metadata={
            "mode": r["mode"],
            "trading_days": MetadataValue.json(r["days"]),
            "windows_marked": MetadataValue.int(r["windows_marked"]),
            "windows_refreshed (instrument x 5 min)": MetadataValue.int(r["windows_refreshed"]),
            "dirty_windows_left": MetadataValue.int(r["windows_left"]),
            "seconds": MetadataValue.float(r["seconds"]),
        }
    )
