"""Batched, idempotent tick writes: binary COPY into session temp tables, then one call of
``nadi_ingest_staged`` (dbt_or_sql/0010_ingest_state.sql) that checks the batch was classified
against the stored state, inserts with ON CONFLICT DO NOTHING, records gaps, settles late
ticks and advances ``ingest_state``, all in one transaction. ``load_state`` reads that state:
the database, not Redis, is the record of the last sequence per instrument and day."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

import asyncpg

from nadi.sequence import Gap
from nadi.tick import TICK_MEASURES, Tick
from nadi.times import date_ordinal, ordinal_date

Key = tuple[int, int]  # (instrument_token, trading day ordinal since 1970-01-01)


class StateMoved(Exception):
    """The database's last sequence of an instrument-day is not the one the batch was
    classified against (another writer got there first): nothing was written."""


TICK_STAGE_COLUMNS = (
    "instrument_token", "ts_us", "sequence_id", *TICK_MEASURES, "status", "feed", "trading_day",
)  # fmt: skip
GAP_STAGE_COLUMNS = ("instrument_token", "trading_day", "from_seq", "to_seq")

CREATE_STAGES = """
CREATE TEMP TABLE IF NOT EXISTS tick_stage (
    instrument_token bigint, ts_us bigint, sequence_id bigint, last_price float8,
    last_qty bigint, volume bigint, oi bigint, bid float8, ask float8, bid_qty bigint,
    ask_qty bigint, status text, feed text, trading_day date
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS gap_stage (
    instrument_token bigint, trading_day date, from_seq bigint, to_seq bigint
) ON COMMIT DELETE ROWS;
"""


async def init_connection(conn: asyncpg.Connection) -> None:
    """Pool ``init``: the staging tables live for the session."""
    await conn.execute(CREATE_STAGES)


@dataclass(frozen=True, slots=True)
class LateOutcome:
    """What the database made of one LATE tick."""

    stored_now: bool  # inserted by this batch (False: its sequence was already stored)
    status: str  # the stored row's status: RECOVERED inside an open gap, else OK


@dataclass(frozen=True, slots=True)
class WriteResult:
    inserted: int  # new rows in ticks
    stale: int
    recovered: int
    late_dropped: int  # late ticks whose sequence was already stored (kept the first)
    gaps_new: int
    gaps_closed: int
    late: tuple[LateOutcome, ...] = ()  # one per LATE input tick, in input order


# After nadi_ingest_staged, in its transaction: a LATE tick still in the stage was inserted;
# the status is the stored row's either way (found by the exact key for a copy, else by day).
_LATE_OUTCOMES = """
SELECT EXISTS (SELECT 1 FROM tick_stage s
               WHERE s.instrument_token = k.token AND s.trading_day = k.day
                 AND s.sequence_id = k.seq),
       coalesce(
         (SELECT t.status FROM ticks t
           WHERE t.instrument_token = k.token
             AND t.exchange_ts = 'epoch'::timestamptz + k.ts_us * INTERVAL '1 microsecond'
             AND t.sequence_id = k.seq),
         (SELECT t.status FROM ticks t
           WHERE t.instrument_token = k.token
             AND t.exchange_ts >= (k.day::timestamp AT TIME ZONE 'Asia/Kolkata')
             AND t.exchange_ts < ((k.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')
             AND t.sequence_id = k.seq
           LIMIT 1))
FROM unnest($1::bigint[], $2::date[], $3::bigint[], $4::bigint[])
     WITH ORDINALITY AS k(token, day, seq, ts_us, n)
ORDER BY k.n
"""

_LOAD_STATE = """
SELECT k.token, k.day,
       coalesce(s.last_seq,
                (SELECT max(t.sequence_id) FROM ticks t
                  WHERE t.instrument_token = k.token
                    AND t.exchange_ts >= (k.day::timestamp AT TIME ZONE 'Asia/Kolkata')
                    AND t.exchange_ts < ((k.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')))
FROM unnest($1::bigint[], $2::date[]) AS k(token, day)
LEFT JOIN ingest_state s ON s.instrument_token = k.token AND s.trading_day = k.day
"""


async def load_state(
    db: asyncpg.Pool | asyncpg.Connection, keys: Sequence[Key]
) -> dict[Key, int | None]:
    """The last stored sequence of each (token, day), None where nothing is stored; one
    round trip. ingest_state is exact; ticks are read only for a day it has no row for
    (written by another path than nadi_ingest_staged)."""
    if not keys:
        return {}
    rows = await db.fetch(_LOAD_STATE, [k[0] for k in keys], [ordinal_date(k[1]) for k in keys])
    return {(token, date_ordinal(day)): last for token, day, last in rows}


async def write_batch(
    conn: asyncpg.Connection,
    ticks: Sequence[Tick],
    day_ordinals: Sequence[int],
    statuses: Sequence[str],
    gaps: Sequence[Gap],
    *,
    mark_dirty: bool,
    expected: Mapping[Key, int | None] | None = None,
) -> WriteResult:
    """Persist one batch atomically. Safe to repeat: a redelivered batch inserts nothing new.
    ``expected``: the last sequence per (token, day) the batch was classified against; if
    the database holds another, StateMoved is raised and nothing is written."""
    days: dict[int, date] = {}
    records = []
    for t, d, status in zip(ticks, day_ordinals, statuses, strict=True):
        day = days.get(d)
        if day is None:
            day = days[d] = ordinal_date(d)
        records.append(
            (
                t.instrument_token,
                t.exchange_ts // 1000,
                t.sequence_id,
                t.last_price,
                t.last_qty,
                t.volume,
                t.oi,
                t.bid,
                t.ask,
                t.bid_qty,
                t.ask_qty,
                status,
                t.feed,
                day,
            )
        )
    async with conn.transaction():
        await conn.copy_records_to_table("tick_stage", records=records, columns=TICK_STAGE_COLUMNS)
        if gaps:
            await conn.copy_records_to_table(
                "gap_stage",
                records=[(g.token, ordinal_date(g.day), g.from_seq, g.to_seq) for g in gaps],
                columns=GAP_STAGE_COLUMNS,
            )
        exp = expected or {}
        try:
            row = await conn.fetchrow(
                "SELECT * FROM nadi_ingest_staged($1, $2, $3, $4)",
                mark_dirty,
                [k[0] for k in exp],
                [ordinal_date(k[1]) for k in exp],
                list(exp.values()),
            )
        except asyncpg.PostgresError as e:
            if getattr(e, "sqlstate", None) == "NS001":
                raise StateMoved(str(e)) from e
            raise
        late_idx = [i for i, st in enumerate(statuses) if st == "LATE"]
        late: tuple[LateOutcome, ...] = ()
        if late_idx:
            rows = await conn.fetch(
                _LATE_OUTCOMES,
                [ticks[i].instrument_token for i in late_idx],
                [days[day_ordinals[i]] for i in late_idx],
                [ticks[i].sequence_id for i in late_idx],
                [ticks[i].exchange_ts // 1000 for i in late_idx],
            )
            late = tuple(LateOutcome(bool(r[0]), r[1] or "OK") for r in rows)
    assert row is not None
    inserted, stale, recovered, late_dropped, gaps_new, gaps_closed = (int(v) for v in row)
    return WriteResult(inserted, stale, recovered, late_dropped, gaps_new, gaps_closed, late)
