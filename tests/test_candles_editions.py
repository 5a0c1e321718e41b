"""One candle definition, no stale candle, the same bytes on both editions (issue 9).

A generated trading day goes through Kafka and the real MarketDataProcessor into each
edition's database; ``/v1/candles`` is read through the app after every step and compared
with candles computed here from the ticks sent (open/close by (exchange_ts, sequence_id)):

1. the day's ticks, nothing refreshed yet (raw tail only);
2. after the refresh Dagster runs (rollup on Apache, continuous aggregates with the license);
3. late ticks (held back, one at 999.0 sharing its microsecond with a stored tick) into
   materialized buckets: visible as soon as the processor committed them;
4. a back-filled past day: all its 1-minute candles at once, before any refresh;
5. after a refresh again.

Every response of every step is then compared byte for byte between the editions.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec

from nadi.db.migrate import run_migrations
from nadi.settings import Settings
from nadi.tick import Tick
from nadi.times import EPOCH
from pipelines.assets.candles import refresh_marked
from tests.editions import EDITIONS, fresh_database, on_edition
from tests.kafka_util import produce, wait_caught_up
from tests.processor_util import private_settings, reset_state, running_worker
from tests.rest_util import Row, client, random_rows

TOKENS = (9_400_001, 9_400_002)
DAY = date(2025, 3, 4)  # a Tuesday, NSE trading day
DAY_OPEN = datetime(2025, 3, 4, 3, 45, tzinfo=UTC)  # 09:15 IST
PAST = date(2025, 3, 3)
PAST_OPEN = datetime(2025, 3, 3, 4, 0, tzinfo=UTC)  # 09:30 IST
FAR = datetime(2100, 1, 1, tzinfo=UTC)
INTERVALS = {"1m": (60, 0), "5m": (300, 0), "15m": (900, 0), "1h": (3600, 13_500),
             "1d": (86_400, 66_600)}  # fmt: skip  # step s, grid origin s (09:15 / 00:00 IST)


def _day_params(d: date) -> dict[str, str]:
    return {"start": f"{d.isoformat()}T00:00:00+05:30",
            "end": f"{(d + timedelta(days=1)).isoformat()}T00:00:00+05:30"}  # fmt: skip


def _rows() -> tuple[list[Row], list[Row], list[Row]]:
    """(the day's ticks sent first, the late ones held back, the back-filled past day)."""
    rng = random.Random(9)
    first: list[Row] = []
    late: list[Row] = []
    for i, tok in enumerate(TOKENS):
        rows = random_rows(rng, tok, DAY_OPEN + timedelta(seconds=7 * i), 700,
                           max_step_ms=6000, tie_rate=0.2)  # fmt: skip
        # Hold back two ticks inside the first half hour; the one of the first instrument
        # shares its microsecond with the tick before it, and sets the bucket's high.
        ties = [k for k in range(20, 300) if rows[k].exchange_ts == rows[k - 1].exchange_ts]
        held = {ties[0], 310}
        if i == 0:
            rows[ties[0]] = rows[ties[0]]._replace(last_price=999.0)
        late += [rows[k] for k in sorted(held)]
        first += [r for k, r in enumerate(rows) if k not in held]
    # 13 minutes of the past day: 13 one-minute candles, ties included.
    past = random_rows(rng, TOKENS[0], PAST_OPEN, 600, max_step_ms=6000, tie_rate=0.25)
    past = [r for r in past if r.exchange_ts < PAST_OPEN + timedelta(minutes=13)]
    return first, late, past


def _expected(rows: list[Row], interval: str) -> list[dict[str, Any]]:
    step, origin = INTERVALS[interval]
    groups: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        s = int((r.exchange_ts - EPOCH).total_seconds())
        groups[origin + (s - origin) // step * step].append(r)
    out = []
    for b in sorted(groups):
        g = sorted(groups[b], key=lambda r: (r.exchange_ts, r.sequence_id))
        prices = [r.last_price for r in g]
        ist = (EPOCH + timedelta(seconds=b, hours=5, minutes=30)).strftime("%Y-%m-%dT%H:%M:%S")
        out.append({"bucket": ist + "+05:30", "open": g[0].last_price, "high": max(prices),
                    "low": min(prices), "close": g[-1].last_price,
                    "volume": sum(r.last_qty or 0 for r in g), "tick_count": len(g)})  # fmt: skip
    return out


def _messages(rows: list[Row]) -> list[tuple[bytes | None, bytes]]:
    return [
        (
            str(r.instrument_token).encode(),
            msgspec.json.encode(
                Tick(
                    r.instrument_token,
                    r.sequence_id,
                    r.ts_ns,
                    r.last_price,
                    exchange="NSE",
                    last_qty=r.last_qty,
                )
            ),
        )
        for r in rows
    ]


class _Edition:
    """One edition's database, processor and API."""

    def __init__(self, s: Settings, api: httpx.AsyncClient) -> None:
        self.s, self.api = s, api
        self.bodies: list[bytes] = []

    async def send(self, rows: list[Row]) -> None:
        await asyncio.to_thread(produce, self.s.kafka_bootstrap, self.s.topic_ticks,
                                _messages(rows))  # fmt: skip
        await wait_caught_up(self.s.kafka_bootstrap, self.s.group_id, self.s.topic_ticks)

    async def candles(self, token: int, interval: str, d: date) -> list[dict[str, Any]]:
        r = await self.api.get(
            "/v1/candles",
            params={"instrument_token": token, "interval": interval, **_day_params(d)},
        )
        assert r.status_code == 200, r.text
        self.bodies.append(r.content)
        out: list[dict[str, Any]] = r.json()["candles"]
        return out

    async def refresh(self) -> int:
        conn = await asyncpg.connect(self.s.pg_dsn)
        try:
            return int((await refresh_marked(conn, FAR))["windows_refreshed"])
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: object) -> Any:
        conn = await asyncpg.connect(self.s.pg_dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


async def _scenario(e: _Edition, edition: str) -> None:
    first, late, past = _rows()
    day_all = first + late

    async def check(rows: list[Row], d: date, tokens: tuple[int, ...] = TOKENS) -> None:
        for tok in tokens:
            mine = [r for r in rows if r.instrument_token == tok]
            for iv in INTERVALS:
                assert await e.candles(tok, iv, d) == _expected(mine, iv), (edition, tok, iv, d)

    await e.send(first)
    await check(first, DAY)  # 1: nothing refreshed, all from raw ticks
    assert await e.refresh() > 0
    assert await e.fetchval("SELECT count(*) FROM candle_dirty") == 0
    stored = await e.fetchval("SELECT count(*) FROM candles_1m")
    assert stored == sum(
        len(_expected([r for r in first if r.instrument_token == t], "1m")) for t in TOKENS
    )
    await check(first, DAY)  # 2: all from the refreshed tables

    await e.send(late)  # 3: late ticks into materialized buckets, no refresh
    assert await e.fetchval("SELECT count(*) FROM candle_dirty") > 0
    got = await e.candles(TOKENS[0], "1m", DAY)
    hit = next(c for c in got if c["high"] == 999.0)
    want = _expected([r for r in day_all if r.instrument_token == TOKENS[0]], "1m")
    assert hit == next(c for c in want if c["bucket"] == hit["bucket"])
    await check(day_all, DAY)

    await e.send(past)  # 4: a back-filled past day, no refresh
    got = await e.candles(TOKENS[0], "1m", PAST)
    assert len(got) == 13
    await check(past, PAST, TOKENS[:1])

    assert await e.refresh() > 0  # 5: refreshed again
    assert await e.fetchval("SELECT count(*) FROM candle_dirty") == 0
    await check(day_all, DAY)
    await check(past, PAST, TOKENS[:1])


async def _run_on(settings: Settings, edition: str) -> list[bytes]:
    s = on_edition(settings, edition)
    s = await fresh_database(s, f"{s.pg_database}_candles")
    await run_migrations(s)
    s = await private_settings(s, partitions=2)
    # The days are in the past: lift the ingest age limit (DESIGN.md 4) for this worker.
    s = s.model_copy(update={"max_tick_age_s": 1e10})
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        assert await conn.fetchval("SHOW timescaledb.license") == edition
        await reset_state(conn, s)
    finally:
        await conn.close()
    async with client(s) as api, running_worker(s):
        e = _Edition(s, api)
        await _scenario(e, edition)
    return e.bodies


async def test_candles_are_the_same_on_both_editions_before_and_after_refresh(
    settings: Settings,
) -> None:
    """The scenario on every available edition (each in a database of its own), then every
    response compared byte for byte between them."""
    bodies = {ed: await _run_on(settings, ed) for ed in EDITIONS}
    apache = bodies["apache"]
    assert len(apache) == 52  # responses per edition: 5 checks of 5 intervals, plus 2 probes
    for ed, b in bodies.items():
        assert b == apache, ed
