"""``GET /v1/candles``: OHLCV candles that never miss a tick because a refresh is pending.

Sources. 1m and 5m read ``candles_1m`` / ``candles_5m`` for windows that are refreshed, and
compute the rest from raw ``ticks``:

* a 5-minute window listed in ``candle_dirty`` for the instrument (the tick writer marks the
  windows of every row it commits, late and back-filled ticks included, on both editions;
  a refresh forgets the marks it has covered), and
* everything from the 5-minute window after the table's newest bucket for the instrument
  (never refreshed yet).

Both editions take the same path: the continuous aggregates are materialized-only
(dbt_or_sql/0012), so the stored tables hold exactly what a refresh computed, like the rollup.

Two statements: a cheap one finds the dirty windows and the refreshed frontier, then the main
one reads stored candles outside those and aggregates raw ticks only inside them, with the
raw time bounds as constants so TimescaleDB excludes every other chunk at plan time (with
1-hour tick chunks, planning one statement over a month of chunks cost ~20 ms). Between the
two a refresh may run: raw ticks are always right, so the answer is still complete; a tick
arriving in between may be missed, as if the request had come a moment earlier.

Raw candles come from ``nadi_candles()`` (dbt_or_sql/0011_candle_definition.sql), the one
definition the rollup refresh, the continuous aggregates and the pipelines' check use too:
open = first price by (exchange_ts, sequence_id), close = last, high/low = max/min,
volume = sum(last_qty), tick_count = count. So the same ticks give the same bytes on both
editions, refreshed or not.

Alignment (IST, UTC+05:30, no DST). 1m/5m/15m are aligned to the clock (09:15 IST is on the
15-minute grid anyway); 1h buckets start at 09:15 IST like NSE charts (09:15, 10:15, …, 15:15
holding 15:15-15:30); 1d buckets start at 00:00 IST: a daily candle is one trading day, the
Asia/Kolkata date of exchange_ts (DESIGN.md section 4), so night-session ticks count too.
15m/1h/1d are aggregated from 5m candles (stored + raw tail).

Range. Candles whose bucket start lies in ``[start, end)``; each candle is complete (it may
hold ticks after ``end`` when ``end`` is not on the grid).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from typing import Annotated

import asyncpg
import msgspec
from fastapi import APIRouter, Query, Response

from api.auth import Scope, scoped
from api.rest.deps import Pool
from api.rest.models import CandleSeries, Interval
from api.rest.params import ERRORS, TokenQuery, Window, ensure_known
from nadi.times import IST_OFFSET_S, ordinal_date, to_datetime_us, to_epoch_us

router = APIRouter(tags=["candles"])

_MIN_US = 60_000_000
_WINDOW = timedelta(minutes=5)  # the candle_dirty / refresh grain
# interval -> (step µs, grid origin as UTC epoch µs, base table)
_GRID: dict[str, tuple[int, int, str]] = {
    "1m": (_MIN_US, 0, "1m"),
    "5m": (5 * _MIN_US, 0, "5m"),
    "15m": (15 * _MIN_US, 0, "5m"),
    "1h": (60 * _MIN_US, 225 * _MIN_US, "5m"),  # 03:45 UTC = 09:15 IST
    "1d": (1440 * _MIN_US, 1110 * _MIN_US, "5m"),  # 18:30 UTC = 00:00 IST
}

# The refreshed frontier (first 5-minute window after the newest stored bucket) and the dirty
# windows of the instrument that overlap [$2, $3).
_STATE_SQL = """
SELECT (SELECT time_bucket('5 minutes', max(bucket)) + interval '5 minutes'
        FROM candles_1m WHERE instrument_token = $1),
       array(SELECT bucket FROM candle_dirty
             WHERE instrument_token = $1
               AND bucket > $2::timestamptz - interval '5 minutes' AND bucket < $3
             ORDER BY bucket)
"""

# $2..$3: stored range (ends at the frontier); $4: dirty windows to leave out.
_STORED = """
SELECT bucket, open, high, low, close, volume, tick_count
FROM candles_{tf}
WHERE instrument_token = $1 AND bucket >= $2 AND bucket < $3
  AND NOT (time_bucket('5 minutes', bucket) = ANY($4::timestamptz[]))
"""
# $5/$6: raw tick ranges [a, b); $7..$8: their hull, for plan-time chunk exclusion. The candle
# definition is the database's (nadi_candles, dbt_or_sql/0011), the one the refreshes use.
_RAW = """
SELECT bucket, open, high, low, close, volume, tick_count
FROM nadi_candles('{step}'::interval, array_fill($1::bigint, ARRAY[cardinality($5::timestamptz[])]),
                  $5::timestamptz[], $6::timestamptz[], $7, $8)
"""
_DERIVE = """
SELECT time_bucket({iv}, bucket, {origin}),
       (array_agg(open ORDER BY bucket))[1], max(high), min(low),
       (array_agg(close ORDER BY bucket DESC))[1], sum(volume)::bigint, sum(tick_count)::bigint
FROM ({base}) AS base
GROUP BY 1
"""


# Buckets leave the server as epoch seconds (a bigint decodes several times faster than a
# timestamptz) and are formatted in Python from a per-day cache; rows go out through msgspec.
_OUTER = """
SELECT extract(epoch FROM x.b)::bigint, x.o, x.h, x.l, x.c, x.v, x.n
FROM ({q}) AS x(b, o, h, l, c, v, n)
ORDER BY x.b
"""


def _sql(interval: str, with_raw: bool) -> str:
    _, _, tf = _GRID[interval]
    step = "1 minute" if tf == "1m" else "5 minutes"
    base = _STORED.format(tf=tf)
    if with_raw:
        base += "UNION ALL" + _RAW.format(step=step)
    if interval not in ("1m", "5m"):
        n = 9 if with_raw else 5
        base = _DERIVE.format(iv=f"${n}::interval", origin=f"${n + 1}::timestamptz", base=base)
    return _OUTER.format(q=base)


_SQL = {(iv, raw): _sql(iv, raw) for iv in _GRID for raw in (False, True)}


class _Candle(msgspec.Struct, array_like=False):
    """Wire shape of :class:`api.rest.models.Candle` (the pydantic model documents it)."""

    bucket: str
    open: float
    high: float
    low: float
    close: float
    volume: int
    tick_count: int


class _Series(msgspec.Struct):
    instrument_token: int
    interval: str
    candles: list[_Candle]


_encode = msgspec.json.Encoder().encode


@lru_cache(maxsize=4096)
def _ist_date(day: int) -> str:
    return ordinal_date(day).isoformat() + "T"


_HHMM = tuple(f"{m // 60:02d}:{m % 60:02d}:00+05:30" for m in range(1440))


def ist_minute(epoch_s: int) -> str:
    """Epoch seconds (on a whole minute) -> ISO-8601 in IST, e.g. 2025-01-06T09:15:00+05:30.
    Two cached pieces: this runs once per candle, thousands of times per request."""
    day, sec = divmod(epoch_s + IST_OFFSET_S, 86_400)
    return _ist_date(day) + _HHMM[sec // 60]


def _ceil_to_grid(us: int, step: int, origin: int) -> int:
    return origin + -(-(us - origin) // step) * step


def grid_range(interval: str, start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The tick range ``[lo, hi)`` whose candles have their bucket start in ``[start, end)``."""
    step, origin, _ = _GRID[interval]
    lo = _ceil_to_grid(to_epoch_us(start), step, origin)
    hi = _ceil_to_grid(to_epoch_us(end), step, origin)
    return to_datetime_us(lo), to_datetime_us(hi)


def raw_ranges(
    lo: datetime, hi: datetime, frontier: datetime | None, dirty: list[datetime]
) -> tuple[datetime, list[tuple[datetime, datetime]]]:
    """(end of the stored range, tick ranges to aggregate raw), adjacent ranges merged.

    Everything at or after ``frontier`` (all of it when nothing is stored) is raw; so are the
    dirty windows before it, clipped to ``[lo, hi)``.
    """
    stored_end = lo if frontier is None else max(lo, min(hi, frontier))
    spans = [(max(lo, d), min(hi, d + _WINDOW)) for d in dirty if d < stored_end]
    if stored_end < hi:
        spans.append((stored_end, hi))
    merged: list[tuple[datetime, datetime]] = []
    for a, b in spans:
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return stored_end, merged


@router.get(
    "/candles",
    response_model=CandleSeries,
    responses=ERRORS,
    summary="OHLCV candles (1m, 5m, 15m, 1h, 1d), refreshed or not",
    **scoped(Scope.READ),
)
async def get_candles(
    pool: Pool,
    instrument_token: TokenQuery,
    rng: Window,
    interval: Annotated[Interval, Query(description="candle length", examples=["1m"])] = "1m",
) -> Response:
    lo, hi = grid_range(interval, rng.start, rng.end)
    step, origin, _ = _GRID[interval]
    rows: list[asyncpg.Record] = []
    async with pool.acquire() as conn:
        if lo < hi:
            frontier, dirty = await conn.fetchrow(_STATE_SQL, instrument_token, lo, hi)
            stored_end, spans = raw_ranges(lo, hi, frontier, list(dirty))
            args: list[object] = [instrument_token, lo, stored_end, dirty]
            if spans:
                args += [[a for a, _ in spans], [b for _, b in spans], spans[0][0], spans[-1][1]]
            if interval not in ("1m", "5m"):
                args += [timedelta(microseconds=step), to_datetime_us(origin)]
            rows = await conn.fetch(_SQL[interval, bool(spans)], *args)
        if not rows:
            await ensure_known(conn, [instrument_token])
    return Response(
        _encode(
            _Series(
                instrument_token,
                interval,
                [_Candle(ist_minute(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows],
            )
        ),
        media_type="application/json",
    )
