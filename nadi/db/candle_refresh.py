"""Refresh the candles of whole trading days, on either edition, from the core.

The same work as the Dagster candles asset's full refresh (pipelines/assets/candles.py), for
callers that may not import pipelines (the history importer): every window of the day is
marked and recomputed with the one candle definition (dbt_or_sql/0011), by the rollup
(``nadi_refresh_candles``, Apache edition) or by a forced continuous-aggregate refresh
(Timescale license) followed by forgetting the marks its prior snapshot saw committed.
``conn`` must not be in a transaction (a continuous-aggregate refresh cannot run in one).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

import asyncpg

from nadi.times import day_bounds

# Every window of the day holding ticks, and those holding candles but no ticks any more.
_MARK_DAY = """
WITH w AS (
    SELECT DISTINCT instrument_token, time_bucket(INTERVAL '5 minutes', exchange_ts) AS bucket
    FROM ticks WHERE exchange_ts >= $1 AND exchange_ts < $2
    UNION
    SELECT DISTINCT instrument_token, time_bucket(INTERVAL '5 minutes', bucket)
    FROM candles_1m WHERE bucket >= $1 AND bucket < $2
)
INSERT INTO candle_dirty (instrument_token, bucket)
SELECT instrument_token, bucket FROM w ORDER BY 2, 1
ON CONFLICT DO NOTHING
"""


async def refresh_candles_days(
    conn: asyncpg.Connection, days: Iterable[date], *, whole_days: bool = True
) -> int:
    """Recompute candles_1m and candles_5m over each of ``days``; returns the number of
    (instrument, 5-minute window) marks refreshed. ``whole_days=False``: only the windows
    the writes marked (the tick writer and ``nadi_maint_replace_days`` mark every window they
    change), i.e. no backfill of windows nobody touched."""
    mode = str(await conn.fetchval("SELECT mode FROM candle_mode"))
    total = 0
    for day in sorted(set(days)):
        start, end = day_bounds(day)
        if mode == "rollup":
            if whole_days:
                async with conn.transaction():
                    await conn.execute(_MARK_DAY, start, end)
            total += int(await conn.fetchval("SELECT nadi_refresh_candles($1, $2)", start, end))
        else:
            snapshot = await conn.fetchval("SELECT pg_current_snapshot()")
            for view in ("candles_1m", "candles_5m"):  # 5m is hierarchical on 1m
                await conn.execute(
                    f"CALL refresh_continuous_aggregate('{view}', $1::timestamptz,"
                    " $2::timestamptz, force => $3)",
                    start,
                    end,
                    whole_days,
                )
            total += int(
                await conn.fetchval(
                    "SELECT nadi_forget_refreshed_marks($1::pg_snapshot, $2, $3)",
                    snapshot,
                    start,
                    end,
                )
            )
    return total
