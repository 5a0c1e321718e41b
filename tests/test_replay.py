"""ReplayEngine against real PostgreSQL: merged order, completeness across keyset pages,
range bounds, resume positions, pacing; and the `nadi replay` outputs (NDJSON, Kafka)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from typer import Typer
from typer.testing import CliRunner

from command.replay import replay
from nadi.codec import encode
from nadi.db.pool import create_pool
from nadi.replay import ReplayEngine, replay_to_kafka
from nadi.settings import Settings
from nadi.tick import LiveTick, Tick
from tests.kafka_util import create_topic, read_all
from tests.rest_util import Row, random_rows, seed

TOKENS = [9_200_001, 9_200_257, 9_200_513, 9_200_769]
T0 = datetime(2024, 3, 5, 3, 45, tzinfo=UTC)  # 09:15 IST
SPAN_END = T0 + timedelta(hours=1)


def key(r: Row) -> tuple[int, int, int]:
    return (r.ts_ns, r.instrument_token, r.sequence_id)


@pytest.fixture(scope="module")
async def seeded(migrated: Settings) -> list[Row]:
    """Four instruments whose timestamps collide within and across instruments."""
    rng = random.Random(7)
    rows: list[Row] = []
    for tok in TOKENS:
        # Coarse steps (1-3 ms) over few values: many cross-instrument equal timestamps.
        rows += random_rows(rng, tok, T0, 150, max_step_ms=3, tie_rate=0.25)
    conn = await asyncpg.connect(migrated.pg_dsn)
    try:
        await conn.execute("DELETE FROM ticks WHERE instrument_token = ANY($1)", TOKENS)
        await seed(conn, rows, mark_dirty=False)
        await conn.execute(
            "INSERT INTO instruments (instrument_token, tradingsymbol, exchange) VALUES ($1, 'RPLA', 'NSE')"
            " ON CONFLICT (instrument_token) DO UPDATE SET exchange = 'NSE'",
            TOKENS[0],
        )
    finally:
        await conn.close()
    rows.sort(key=key)
    ts = [r.ts_ns for r in rows]
    assert len(set(ts)) < len(ts) - 50, "fixture must have many equal timestamps"
    return rows


@pytest.fixture(scope="module")
async def pool(migrated: Settings) -> asyncpg.Pool:
    p = await create_pool(migrated, min_size=1, max_size=6)
    yield p
    await p.close()


def as_key(t: LiveTick) -> tuple[int, int, int]:
    return (t.exchange_ts, t.instrument_token, t.sequence_id)


async def collect(engine: ReplayEngine, *args: object, **kw: object) -> list[LiveTick]:
    return [t async for b in engine.batches(*args, **kw) for t in b]  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_rows", [1, 7, 5000])
async def test_merged_order_and_completeness(
    pool: asyncpg.Pool, seeded: list[Row], chunk_rows: int
) -> None:
    got = await collect(ReplayEngine(pool, chunk_rows=chunk_rows), TOKENS, T0, SPAN_END)
    assert [as_key(t) for t in got] == [key(r) for r in seeded]
    # Payload and master data come through.
    first = got[0]
    src = seeded[0]
    assert (first.last_price, first.last_qty, first.status, first.feed) == (
        src.last_price, src.last_qty, "OK", "A",
    )  # fmt: skip
    assert {t.exchange for t in got if t.instrument_token == TOKENS[0]} == {"NSE"}
    assert {t.exchange for t in got if t.instrument_token != TOKENS[0]} == {None}


async def test_range_bounds_are_start_inclusive_end_exclusive(
    pool: asyncpg.Pool, seeded: list[Row]
) -> None:
    mid_a, mid_b = seeded[100].exchange_ts, seeded[400].exchange_ts
    got = await collect(ReplayEngine(pool, chunk_rows=7), TOKENS, mid_a, mid_b)
    want = [key(r) for r in seeded if mid_a <= r.exchange_ts < mid_b]
    assert [as_key(t) for t in got] == want
    assert want and want[0][0] == seeded[100].ts_ns  # equal-ts ticks before index 100 included
    subset = await collect(ReplayEngine(pool, chunk_rows=7), [TOKENS[2]], T0, SPAN_END)
    assert [as_key(t) for t in subset] == [
        key(r) for r in seeded if r.instrument_token == TOKENS[2]
    ]


async def test_after_resumes_exactly_after_a_position(
    pool: asyncpg.Pool, seeded: list[Row]
) -> None:
    engine = ReplayEngine(pool, chunk_rows=7)
    want = [key(r) for r in seeded]
    for i in (0, 1, 57, 58, 59, 301, len(seeded) - 2, len(seeded) - 1):
        got = await collect(engine, TOKENS, T0, SPAN_END, after=want[i])
        assert [as_key(t) for t in got] == want[i + 1 :], f"resume after index {i}"
    # A position between stored microseconds: everything from the next microsecond on.
    pos = (want[200][0] + 1, 0, 0)
    got = await collect(engine, TOKENS, T0, SPAN_END, after=pos)
    assert [as_key(t) for t in got] == [k for k in want if k[0] > pos[0]]


async def test_empty_and_unknown(pool: asyncpg.Pool, seeded: list[Row]) -> None:
    engine = ReplayEngine(pool, chunk_rows=7)
    assert await collect(engine, [1], T0, SPAN_END) == []
    assert await collect(engine, TOKENS, SPAN_END, SPAN_END + timedelta(hours=1)) == []
    with pytest.raises(ValueError):
        await collect(engine, TOKENS, T0.replace(tzinfo=None), SPAN_END)


async def test_speed_paces_by_exchange_time(pool: asyncpg.Pool, migrated: Settings) -> None:
    tok = 9_200_999
    base = datetime(2024, 3, 6, 4, 0, tzinfo=UTC)
    # 41 ticks spread evenly over 0.8 s of exchange time.
    rows = [Row(tok, base + timedelta(milliseconds=20 * i), i, 100.0, 1) for i in range(41)]
    conn = await asyncpg.connect(migrated.pg_dsn)
    try:
        await conn.execute("DELETE FROM ticks WHERE instrument_token = $1", tok)
        await seed(conn, rows, mark_dirty=False)
    finally:
        await conn.close()
    engine = ReplayEngine(pool, chunk_rows=7)
    end = base + timedelta(seconds=1)
    for speed, span in ((4.0, 0.2), (1.0, 0.8)):
        t0 = time.monotonic()
        seen: list[tuple[float, int]] = []
        async for batch in engine.batches([tok], base, end, speed=speed):
            seen.extend((time.monotonic() - t0, t.exchange_ts) for t in batch)
        elapsed = time.monotonic() - t0
        assert len(seen) == 41
        assert span * 0.9 <= elapsed <= span + 0.25, (speed, elapsed)
        # Each tick is delivered near its due time: no drift builds up along the way.
        ts0 = seen[0][1]
        lag = max(at - (ts - ts0) / speed / 1e9 for at, ts in seen)
        assert lag < 0.1, f"speed {speed}: a tick came {lag:.3f} s late"
    t0 = time.monotonic()
    assert len(await collect(engine, [tok], base, end, speed=0)) == 41
    assert time.monotonic() - t0 < 0.2


async def test_replay_to_kafka_is_wire_format(
    pool: asyncpg.Pool, seeded: list[Row], migrated: Settings
) -> None:
    topic = await create_topic(migrated.kafka_bootstrap, "test.replay", 2)
    engine = ReplayEngine(pool, chunk_rows=7)
    n = await replay_to_kafka(
        engine, TOKENS[:2], T0, SPAN_END, topic, migrated.kafka_bootstrap, speed=0
    )
    want = [r for r in seeded if r.instrument_token in TOKENS[:2]]
    assert n == len(want)
    msgs = await read_all(migrated.kafka_bootstrap, topic)
    assert len(msgs) == n
    by_key: dict[bytes, list[bytes]] = {}
    for m in msgs:
        by_key.setdefault(m.key, []).append(m.value)  # type: ignore[attr-defined]
    for tok in TOKENS[:2]:
        rows = [r for r in want if r.instrument_token == tok]
        expected = [
            encode(
                Tick(tok, r.sequence_id, r.ts_ns, r.last_price,
                     "NSE" if tok == TOKENS[0] else None, r.last_qty, r.sequence_id * 10, None,
                     r.last_price - 0.05, r.last_price + 0.05, 5, 7, "A")
            )
            for r in rows
        ]  # fmt: skip
        assert by_key[str(tok).encode()] == expected


def test_cli_ndjson(seeded: list[Row]) -> None:
    app = Typer()
    app.command()(replay)
    res = CliRunner().invoke(
        app,
        [
            "--instrument-token", f"{TOKENS[1]},{TOKENS[3]}",
            "-i", str(TOKENS[1]),
            "--start", T0.astimezone(UTC).isoformat(),
            "--end", "2024-03-05T10:15:00+05:30",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{") and '"sequence_id"' in ln]
    got = [msgspec.json.decode(ln, type=LiveTick) for ln in lines]
    want = [key(r) for r in seeded if r.instrument_token in (TOKENS[1], TOKENS[3])]
    assert [as_key(t) for t in got] == want
    assert json.loads(lines[0])["status"] == "OK"
    bad = CliRunner().invoke(
        app, ["-i", "5", "--start", "2024-03-05T09:15:00", "--end", "2024-03-05T10:15:00+05:30"]
    )
    assert bad.exit_code != 0 and "no UTC offset" in bad.output


async def test_many_instruments_bound_memory(pool: asyncpg.Pool, seeded: list[Row]) -> None:
    # Tokens without data still merge correctly and the per-reader page shrinks with count.
    tokens = TOKENS + list(range(1, 200))
    got = await collect(ReplayEngine(pool, chunk_rows=100), tokens, T0, SPAN_END)
    assert [as_key(t) for t in got] == [key(r) for r in seeded]
    await asyncio.sleep(0)


async def test_catch_up_one_instrument(pool: asyncpg.Pool, seeded: list[Row]) -> None:
    engine = ReplayEngine(pool, chunk_rows=7)
    mine = [r for r in seeded if r.instrument_token == TOKENS[1]]
    pos = mine[40]
    got = [t async for b in engine.catch_up(TOKENS[1], pos.ts_ns, pos.sequence_id) for t in b]
    assert [(t.exchange_ts, t.sequence_id) for t in got] == [
        (r.ts_ns, r.sequence_id) for r in mine[41:]
    ]
    got = [t async for b in engine.catch_up(TOKENS[1], pos.ts_ns, -1) for t in b]
    assert [t.sequence_id for t in got] == [r.sequence_id for r in mine if r.ts_ns >= pos.ts_ns]
