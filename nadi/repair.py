"""Gap repair: open rows of ``sequence_gaps`` filled from the exchange's recovery service.

A *batch* is a set of open gaps of one trading day, held by one claim (``claimed_by`` = the
batch key, dbt_or_sql/0014). Claiming counts the attempt, so a run that dies still used one up
and the next batch of that gap has another key. The repair of a batch fetches every missing
range with bounded concurrency, writes what came back through the processor's own idempotent
path (``nadi_ingest_staged`` with status ``LATE``: inserted once as ``RECOVERED``, credited to
its gap, the candle windows marked dirty), closes the gaps that are whole, gives up on a gap
after ``max_attempts`` and releases the claim. Today's repaired ticks also go to the ring and
the live stream, like any late arrival; ``today`` is passed in, never read from the clock.

Everything here takes an asyncpg connection; Dagster (pipelines/) only wires it up.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Literal, Protocol

import asyncpg

from nadi.db.tick_writer import write_batch
from nadi.ring import NEW_LATE, RingWriter
from nadi.tick import Tick
from nadi.times import NS, day_bounds

GapStatus = Literal["repaired", "open", "unrecoverable", "skipped"]
WRITE_CHUNK = 5000  # repaired ticks per write transaction

_GAP_COLUMNS = "id, instrument_token, trading_day, from_seq, to_seq, repair_attempts"


class Retransmitter(Protocol):
    """Where missed ticks come from (the recovery client, or a test's stand-in)."""

    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        """Ticks ``from_seq..to_seq`` (inclusive) of ``token`` on ``day``; fewer when the
        source does not have them all; raises on transport or server errors."""
        ...


@dataclass(frozen=True, slots=True)
class GapRow:
    """One row of ``sequence_gaps``, as a repair sees it."""

    id: int
    instrument_token: int
    trading_day: date
    from_seq: int
    to_seq: int
    repair_attempts: int

    @property
    def size(self) -> int:
        return self.to_seq - self.from_seq + 1

    @classmethod
    def of(cls, r: asyncpg.Record) -> GapRow:
        return cls(
            int(r["id"]), int(r["instrument_token"]), r["trading_day"], int(r["from_seq"]),
            int(r["to_seq"]), int(r["repair_attempts"]),
        )  # fmt: skip


@dataclass(slots=True)
class GapOutcome:
    """What one repair made of one gap."""

    gap_id: int
    instrument_token: int
    trading_day: date
    from_seq: int
    to_seq: int
    status: GapStatus
    attempts: int = 0
    missing: int = 0  # sequences not stored when the run looked
    fetched: int = 0  # of those, what the source gave back (checked)
    inserted: int = 0
    pushed_live: int = 0  # inserted ticks appended to the ring and live stream
    reason: str | None = None

    @classmethod
    def of(cls, g: GapRow, status: GapStatus, reason: str | None = None) -> GapOutcome:
        return cls(g.id, g.instrument_token, g.trading_day, g.from_seq, g.to_seq, status,
                   attempts=g.repair_attempts, reason=reason)  # fmt: skip

    def as_json(self) -> dict[str, object]:
        return {
            "gap": self.gap_id, "instrument_token": self.instrument_token,
            "trading_day": self.trading_day.isoformat(), "from_seq": self.from_seq,
            "to_seq": self.to_seq, "status": self.status, "attempts": self.attempts,
            "missing": self.missing, "fetched": self.fetched, "inserted": self.inserted,
            "pushed_live": self.pushed_live, "reason": self.reason,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Batch:
    """Open gaps of one trading day claimed under ``key``."""

    key: str
    trading_day: date
    gaps: tuple[GapRow, ...]

    @property
    def gap_ids(self) -> list[int]:
        return [g.id for g in self.gaps]


@dataclass(slots=True)
class Claims:
    """What one sensor tick's claim did."""

    batches: list[Batch] = field(default_factory=list)
    gave_up: list[int] = field(default_factory=list)  # ids declared unrecoverable


def ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, distinct sequence numbers as contiguous inclusive ranges."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        elif not out or s > out[-1][1]:
            out.append((s, s))
    return out


def batch_key(day: date, gaps: Sequence[GapRow]) -> str:
    """A batch's stable key: its day, first gap and a digest of (gap, attempt) pairs. The same
    gaps at the same attempts give the same key (the daemon launches a run key once); a new
    attempt gives a new one."""
    h = hashlib.sha1(
        ",".join(f"{g.id}:{g.repair_attempts}" for g in sorted(gaps, key=lambda g: g.id)).encode()
    ).hexdigest()[:12]
    return f"gaps-{day.isoformat()}-{min(g.id for g in gaps)}-n{len(gaps)}-{h}"


def plan_batches(
    gaps: Sequence[GapRow], batch_size: int, max_batches: int
) -> list[tuple[date, list[GapRow]]]:
    """Group gaps (in the given order) per trading day into batches of at most
    ``batch_size``, oldest day first, at most ``max_batches`` of them."""
    per_day: dict[date, list[GapRow]] = {}
    for g in gaps:
        per_day.setdefault(g.trading_day, []).append(g)
    out: list[tuple[date, list[GapRow]]] = []
    for day in sorted(per_day):
        rows = per_day[day]
        for i in range(0, len(rows), batch_size):
            if len(out) == max_batches:
                return out
            out.append((day, rows[i : i + batch_size]))
    return out


def give_up_reason(attempts: int, last: str | None) -> str:
    return f"after {attempts} attempts: {last or 'the last repair run did not finish'}"[:500]


async def claim_batches(
    conn: asyncpg.Connection,
    *,
    grace_s: float,
    batch_size: int,
    max_batches: int,
    max_attempts: int,
    retry_s: float = 0.0,
) -> Claims:
    """Claim open, unclaimed gaps older than ``grace_s`` (late arrivals close most younger
    ones) as batches; one transaction. Rows another transaction holds are skipped (SKIP
    LOCKED), so two concurrent calls never claim the same gap. After a failed attempt a gap
    waits ``retry_s`` x 2^(attempts - 1) from that attempt's claim (a recovery service down
    for a minute does not use up every attempt). A gap whose attempts are used up (its last
    run died before deciding) is declared unrecoverable instead."""
    out = Claims()
    if max_batches <= 0:
        return out
    async with conn.transaction():
        rows = [
            GapRow.of(r)
            for r in await conn.fetch(
                f"""SELECT {_GAP_COLUMNS} FROM sequence_gaps
                    WHERE status = 'open' AND claimed_by IS NULL
                      AND detected_at <= now() - make_interval(secs => $1)
                      AND (claimed_at IS NULL OR repair_attempts = 0 OR claimed_at <= now()
                           - make_interval(secs => $3 * 2 ^ (repair_attempts - 1)))
                    ORDER BY detected_at, id LIMIT $2
                    FOR UPDATE SKIP LOCKED""",
                grace_s,
                batch_size * max_batches,
                retry_s,
            )
        ]
        spent = [g for g in rows if g.repair_attempts >= max_attempts]
        if spent:
            await conn.execute(
                """UPDATE sequence_gaps SET status = 'unrecoverable', unrecoverable_at = now(),
                       reason = $2 || coalesce(reason, 'the last repair run did not finish')
                   WHERE id = ANY($1::bigint[])""",
                [g.id for g in spent],
                f"after {max_attempts} attempts: ",
            )
            out.gave_up = [g.id for g in spent]
        live = [g for g in rows if g.repair_attempts < max_attempts]
        for day, gaps in plan_batches(live, batch_size, max_batches):
            counted = [
                GapRow(g.id, g.instrument_token, g.trading_day, g.from_seq, g.to_seq,
                       g.repair_attempts + 1)
                for g in gaps
            ]  # fmt: skip
            key = batch_key(day, counted)
            await conn.execute(
                """UPDATE sequence_gaps SET claimed_by = $2, claimed_at = now(),
                       repair_attempts = repair_attempts + 1
                   WHERE id = ANY($1::bigint[])""",
                [g.id for g in gaps],
                key,
            )
            out.batches.append(Batch(key, day, tuple(counted)))
    return out


async def claim_for_run(
    conn: asyncpg.Connection, key: str, *, gap_ids: Sequence[int], day: date | None
) -> list[GapRow]:
    """The open gaps a run repairs under ``key``: those already claimed under it (by the
    sensor, attempt counted then) and, for a run started by hand, the unclaimed ones it names
    (or every unclaimed open gap of ``day`` when it names none), claimed now with the attempt
    counted. Gaps another claim holds are left alone."""
    return [
        GapRow.of(r)
        for r in await conn.fetch(
            f"""UPDATE sequence_gaps SET claimed_at = now(), claimed_by = $1,
                    repair_attempts = repair_attempts
                        + CASE WHEN claimed_by IS NOT DISTINCT FROM $1 THEN 0 ELSE 1 END
                WHERE status = 'open' AND (claimed_by IS NULL OR claimed_by = $1)
                  AND ($3::date IS NULL OR trading_day = $3)
                  AND (cardinality($2::bigint[]) = 0 OR id = ANY($2::bigint[]))
                RETURNING {_GAP_COLUMNS}""",
            key,
            list(gap_ids),
            day,
        )
    ]


async def not_taken(
    conn: asyncpg.Connection, key: str, gap_ids: Sequence[int], taken: Iterable[int]
) -> list[GapOutcome]:
    """Outcomes of the gaps a run named but did not take: closed meanwhile (by a late
    arrival: repaired), given up, or held by another claim (skipped)."""
    left = sorted(set(gap_ids) - set(taken))
    if not left:
        return []
    out: list[GapOutcome] = []
    for r in await conn.fetch(
        f"SELECT {_GAP_COLUMNS}, status, claimed_by, reason FROM sequence_gaps"
        " WHERE id = ANY($1::bigint[]) ORDER BY id",
        left,
    ):
        g = GapRow.of(r)
        if r["status"] == "open":
            out.append(GapOutcome.of(g, "skipped", f"claimed by {r['claimed_by']}"))
        elif r["status"] == "repaired":
            out.append(GapOutcome.of(g, "repaired", "closed before this run"))
        else:
            out.append(GapOutcome.of(g, "unrecoverable", r["reason"]))
    return out


async def release(conn: asyncpg.Connection, keys: Sequence[str]) -> int:
    """Drop the claims ``keys`` (a run ended, or died): their open gaps are free again.
    ``claimed_at`` stays: when the last attempt began (the retry backoff counts from it)."""
    n = await conn.fetchval(
        """WITH r AS (UPDATE sequence_gaps SET claimed_by = NULL
                      WHERE claimed_by = ANY($1::text[]) RETURNING 1)
           SELECT count(*) FROM r""",
        list(keys),
    )
    return int(n)


async def claims_held(conn: asyncpg.Connection) -> dict[str, float]:
    """Claim key -> seconds since it was taken (oldest of its gaps)."""
    rows = await conn.fetch(
        """SELECT claimed_by, extract(epoch FROM now() - min(claimed_at))::float8
           FROM sequence_gaps WHERE claimed_by IS NOT NULL GROUP BY 1"""
    )
    return {str(r[0]): float(r[1]) for r in rows}


# Stored sequences inside each gap, one index range scan per gap (the unique index leads with
# instrument_token, exchange_ts: the scan covers the instrument's day).
_STORED_SQL = """
SELECT g.id, t.sequence_id
FROM unnest($1::bigint[], $2::bigint[], $3::date[], $4::bigint[], $5::bigint[])
     AS g(id, tok, day, lo, hi)
JOIN ticks t ON t.instrument_token = g.tok
  AND t.exchange_ts >= (g.day::timestamp AT TIME ZONE 'Asia/Kolkata')
  AND t.exchange_ts < ((g.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')
  AND t.sequence_id BETWEEN g.lo AND g.hi
"""


async def stored_sequences(conn: asyncpg.Connection, gaps: Sequence[GapRow]) -> dict[int, set[int]]:
    """Gap id -> the sequences of its range already in ``ticks``."""
    out: dict[int, set[int]] = {g.id: set() for g in gaps}
    if not gaps:
        return out
    rows = await conn.fetch(
        _STORED_SQL,
        [g.id for g in gaps], [g.instrument_token for g in gaps], [g.trading_day for g in gaps],
        [g.from_seq for g in gaps], [g.to_seq for g in gaps],
    )  # fmt: skip
    for r in rows:
        out[int(r[0])].add(int(r[1]))
    return out


async def _fetch_gap(
    source: Retransmitter, g: GapRow, missing: list[int], sem: asyncio.Semaphore
) -> tuple[list[Tick], str | None]:
    """The missing ticks of one gap, range by range (each request holds a permit); checked:
    only asked-for sequences of this instrument and day are kept."""
    want = set(missing)
    start, end = day_bounds(g.trading_day)
    lo_ns, hi_ns = int(start.timestamp()) * NS, int(end.timestamp()) * NS
    got: list[Tick] = []
    try:
        for a, b in ranges(missing):
            async with sem:
                got.extend(await source.retransmit(g.instrument_token, g.trading_day, a, b))
    except Exception as e:  # any source failure is an attempt with a reason, not a crash
        return [], f"recovery source failed: {type(e).__name__}: {e}"[:400]
    good = [
        t for t in got
        if t.instrument_token == g.instrument_token and t.sequence_id in want
        and lo_ns <= t.exchange_ts < hi_ns
    ]  # fmt: skip
    return list({t.sequence_id: t for t in good}.values()), None


async def repair_batch(
    conn: asyncpg.Connection,
    source: Retransmitter,
    gaps: Sequence[GapRow],
    *,
    key: str,
    today: date,
    max_attempts: int,
    concurrency: int,
    ring: RingWriter | None = None,
    timings: dict[str, float] | None = None,
) -> list[GapOutcome]:
    """Repair ``gaps`` (held under ``key``; ``conn`` has the tick writer's staging tables),
    then release the claim. At most ``concurrency`` requests to the source at a time.
    ``timings`` gets the seconds of each phase (look-up, fetch, write, close)."""
    t = timings if timings is not None else {}
    try:
        return await _repair(conn, source, gaps, today, max_attempts, concurrency, ring, t)
    finally:
        await release(conn, [key])


async def _repair(
    conn: asyncpg.Connection,
    source: Retransmitter,
    gaps: Sequence[GapRow],
    today: date,
    max_attempts: int,
    concurrency: int,
    ring: RingWriter | None,
    timings: dict[str, float],
) -> list[GapOutcome]:
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    stored = await stored_sequences(conn, gaps)
    outcomes = {g.id: GapOutcome.of(g, "open") for g in gaps}
    todo: list[tuple[GapRow, list[int]]] = []
    for g in gaps:
        # Only what is still missing is asked for: late arrivals may have filled part of it.
        missing = [s for s in range(g.from_seq, g.to_seq + 1) if s not in stored[g.id]]
        outcomes[g.id].missing = len(missing)
        if missing:
            todo.append((g, missing))
    sem = asyncio.Semaphore(max(1, concurrency))
    lap("lookup_s")
    fetched = await asyncio.gather(*(_fetch_gap(source, g, m, sem) for g, m in todo))
    lap("fetch_s")
    errors: dict[int, str] = {}
    good: list[tuple[int, Tick]] = []
    for (g, _), (ticks, err) in zip(todo, fetched, strict=True):
        outcomes[g.id].fetched = len(ticks)
        if err:
            errors[g.id] = err
        good.extend((g.id, t) for t in ticks)
    for i in range(0, len(good), WRITE_CHUNK):
        chunk = good[i : i + WRITE_CHUNK]
        ticks = [t for _, t in chunk]
        # Repaired ticks mark their windows on both editions: the API serves marked windows
        # from raw ticks until the candles are refreshed (issue 9).
        res = await write_batch(
            conn, ticks, [t.trading_day_ordinal for t in ticks], ["LATE"] * len(ticks), [],
            mark_dirty=True,
        )  # fmt: skip
        new = [(gid, t, o.status) for (gid, t), o in zip(chunk, res.late, strict=True)
               if o.stored_now]  # fmt: skip
        for gid, t, _ in new:
            outcomes[gid].inserted += 1
            stored[gid].add(t.sequence_id)
        for gid, t in chunk:  # already stored (by a late arrival meanwhile) counts as stored
            stored[gid].add(t.sequence_id)
        if ring is not None:
            live = [(gid, t, st) for gid, t, st in new if outcomes[gid].trading_day == today]
            offsets = await ring.append(
                [t for _, t, _ in live], [t.trading_day_ordinal for _, t, _ in live],
                [st for _, _, st in live], [NEW_LATE] * len(live),
            )  # fmt: skip
            for (gid, _, _), off in zip(live, offsets, strict=True):
                outcomes[gid].pushed_live += 1 if off else 0
    lap("write_s")
    whole: list[int] = []
    for g in gaps:
        o = outcomes[g.id]
        left = g.size - len(stored[g.id])
        if left <= 0:
            o.status = "repaired"
            whole.append(g.id)
            continue
        o.reason = errors.get(g.id) or (
            f"recovery source returned {o.fetched} of {o.missing} missing ticks; "
            f"{left} sequences still missing"
        )
        if g.repair_attempts >= max_attempts:
            o.status = "unrecoverable"
            o.reason = give_up_reason(g.repair_attempts, o.reason)
    # The ingest function closed most already; this also closes a gap whose sequences were
    # stored by a path that did not credit it.
    await conn.execute(
        """UPDATE sequence_gaps SET status = 'repaired', reason = NULL,
               repaired_at = coalesce(repaired_at, now())
           WHERE id = ANY($1::bigint[])""",
        whole,
    )
    rest = [o for o in outcomes.values() if o.status != "repaired"]
    await conn.execute(
        """UPDATE sequence_gaps g SET reason = u.reason, status = u.status,
               unrecoverable_at = CASE WHEN u.status = 'unrecoverable' THEN now() END
           FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, reason, status)
           WHERE g.id = u.id AND g.status = 'open'""",
        [o.gap_id for o in rest], [o.reason for o in rest], [o.status for o in rest],
    )  # fmt: skip
    lap("close_s")
    return [outcomes[g.id] for g in gaps]


def count_by_status(outcomes: Sequence[GapOutcome]) -> dict[GapStatus, int]:
    statuses: tuple[GapStatus, ...] = ("repaired", "open", "unrecoverable", "skipped")
    return {s: sum(o.status == s for o in outcomes) for s in statuses}


@dataclass(frozen=True, slots=True)
class GapMetrics:
    """What alerts watch: open gaps, the oldest one's age, and today's (IST) outcomes."""

    open: int
    oldest_open_age_s: float  # 0 with nothing open
    claimed: int  # open gaps a repair run holds right now
    unrecoverable_today: int
    repaired_today: int  # closed today, by a repair or by a late arrival


# Every term is served by a partial index of 0004/0014 (open gaps, repaired_at,
# unrecoverable_at); "today" starts at 00:00 IST. Readable by nadi_api (SELECT on the table).
GAP_METRICS_SQL = """
WITH d AS (SELECT date_trunc('day', now() AT TIME ZONE 'Asia/Kolkata')
                  AT TIME ZONE 'Asia/Kolkata' AS start)
SELECT
  (SELECT count(*) FROM sequence_gaps WHERE status = 'open') AS open,
  (SELECT coalesce(extract(epoch FROM now() - min(detected_at)), 0)::float8
     FROM sequence_gaps WHERE status = 'open') AS oldest_open_age_s,
  (SELECT count(*) FROM sequence_gaps WHERE status = 'open' AND claimed_by IS NOT NULL)
     AS claimed,
  (SELECT count(*) FROM sequence_gaps, d WHERE unrecoverable_at >= d.start)
     AS unrecoverable_today,
  (SELECT count(*) FROM sequence_gaps, d WHERE status = 'repaired' AND repaired_at >= d.start)
     AS repaired_today
"""


async def gap_metrics(conn: asyncpg.Connection) -> GapMetrics:
    r = await conn.fetchrow(GAP_METRICS_SQL)
    assert r is not None
    return GapMetrics(
        int(r["open"]), float(r["oldest_open_age_s"]), int(r["claimed"]),
        int(r["unrecoverable_today"]), int(r["repaired_today"]),
    )  # fmt: skip
