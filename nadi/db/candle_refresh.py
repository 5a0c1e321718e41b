"""Refresh the candles of whole trading days, on either edition, from the core.

The one refresh mechanism: the Dagster candles assets (pipelines/assets/candles.py) and the
history importer call it. Every window of the day is
marked and recomputed with the one candle definition (dbt_or_sql/0011), by the rollup
(``nadi_refresh_candles``, Apache edition) or by a forced continuous-aggregate refresh
(Timescale license) followed by forgetting the marks its prior snapshot saw committed.
``conn`` must not be in a transaction (a continuous-aggregate refresh cannot run in one).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime

import asyncpg

from nadi.times import day_bounds

# Every window of the day holding ticks, and those holding candles but no ticks any more (ticks
# deleted: they must be emptied too); returns how many marks were new.
MARK_DAY = """
WITH w AS (
    SELECT DISTINCT instrument_token, time_bucket(INTERVAL '5 minutes', exchange_ts) AS bucket
    FROM ticks WHERE exchange_ts >= $1 AND exchange_ts < $2
    UNION
    SELECT DISTINCT instrument_token, time_bucket(INTERVAL '5 minutes', bucket)
    FROM candles_1m WHERE bucket >= $1 AND bucket < $2
), ins AS (
    INSERT INTO candle_dirty (instrument_token, bucket)
    SELECT instrument_token, bucket FROM w ORDER BY 2, 1
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM ins
"""


async def candle_mode(conn: asyncpg.Connection) -> str:
    """``rollup`` (Apache edition) or ``continuous_aggregate`` (Timescale license)."""
    return str(await conn.fetchval("SELECT mode FROM candle_mode"))


async def refresh_aggregates(
    conn: asyncpg.Connection, start: datetime, end: datetime, *, force: bool
) -> int:
    """Timescale license: refresh both continuous aggregates over ``[start, end)`` and forget
    the marks they now cover; returns the number of marks forgotten.

    A refresh cannot run in one transaction with its claim of the marks, so the snapshot comes
    first: every mark it saw committed has its ticks in the refresh that follows, and a mark
    written meanwhile (a tick committed during the refresh) stays, its window served from raw
    ticks until the next refresh. ``conn`` must not be in a transaction.
    """
    snapshot = await conn.fetchval("SELECT pg_current_snapshot()")
    # 5m is hierarchical on 1m: 1m goes first.
    for view in ("candles_1m", "candles_5m"):
        await conn.execute(
            f"CALL refresh_continuous_aggregate('{view}', $1::timestamptz, $2::timestamptz,"
            " force => $3)",
            start,
            end,
            force,
        )
    return int(
        await conn.fetchval(
            "SELECT nadi_forget_refreshed_marks($1::pg_snapshot, $2, $3)", snapshot, start, end
        )
    )


async def refresh_window(
    conn: asyncpg.Connection, mode: str, start: datetime, end: datetime, *, full: bool
) -> tuple[int, int]:
    """Refresh both candle tables over ``[start, end)`` in ``mode``; returns (windows newly
    marked, windows refreshed). ``full``: every window holding ticks or candles, not only the
    marked ones (a backfill of a day whose marks were consumed long ago)."""
    if mode != "rollup":
        # Continuous aggregates track invalidations themselves; a full refresh recomputes
        # every bucket whatever they recorded (force).
        return 0, await refresh_aggregates(conn, start, end, force=full)
    marked = 0
    if full:
        # nadi_refresh_candles only recomputes windows marked dirty: mark the whole day first.
        async with conn.transaction():
            marked = int(await conn.fetchval(MARK_DAY, start, end))
    return marked, int(await conn.fetchval("SELECT nadi_refresh_candles($1, $2)", start, end))


async def refresh_candles_days(
    conn: asyncpg.Connection, days: Iterable[date], *, whole_days: bool = True
) -> int:
    """Recompute candles_1m and candles_5m over each of ``days``; returns the number of
    (instrument, 5-minute window) marks refreshed. ``whole_days=False``: only the windows
    the writes marked (the tick writer and ``nadi_maint_replace_days`` mark every window they
    change), i.e. no backfill of windows nobody touched."""
    mode = await candle_mode(conn)
    total = 0
    for day in sorted(set(days)):
        _, windows = await refresh_window(conn, mode, *day_bounds(day), full=whole_days)
        total += windows
    return total
