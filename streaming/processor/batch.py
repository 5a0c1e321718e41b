"""One batch through the MarketDataProcessor: decode, prepare, and the parts its sinks write.

``decode`` (CPU): bytes to Ticks, the bad ones to be dead-lettered.
``prepare`` (CPU and, on first touch of an instrument-day, reads): drop redundant packets,
classify each tick against the last sequence of its instrument-day, and split the batch into
its sinks' parts: the ring's in-order part, the database part, and (once the database has
settled them) the ring's late part.

State and its owner: the database is the record (``ingest_state``, advanced in the ingest
transaction). This worker keeps the last sequence of the instrument-days it has touched since
it got its partitions in memory; it loads them from the database on first touch (batched,
with the ring check, see nadi.ring) and advances them as it classifies, so batch N+1 is
prepared while batch N is being written and sees it as written. Batches are written in order,
and the database refuses a batch classified against another state than it holds
(StateMoved), so a stale memory can never record a false gap. The memory is reset whenever
ownership changes or a batch is abandoned. Redis holds no classification or dedup state: a
redundant packet is dropped by the recent-ticks memory or, after a restart, by the database's
unique key (a tick at or below the last sequence is LATE, and the database settles it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from nadi.codec import Rejected, TickCodec
from nadi.db.tick_writer import Key, WriteResult, load_state, write_batch
from nadi.logs import get_logger
from nadi.ring import (
    AHEAD,
    BEHIND,
    IN_ORDER,
    IN_ORDER_STATUSES,
    NEW_LATE,
    STORED_LATE,
    RingCheck,
    RingWriter,
)
from nadi.sequence import LATE, Gap, classify
from nadi.settings import Settings
from nadi.tick import Tick
from nadi.times import IST_OFFSET_S, NS
from streaming.processor import dlq, metrics

log = get_logger(__name__)
_DUP_MEMORY = metrics.DUPLICATES.labels(stage="memory")
_DUP_DB = metrics.DUPLICATES.labels(stage="database")
_STATE_MEMORY = metrics.STATE_LOADS.labels(source="memory")
_STATE_DB = metrics.STATE_LOADS.labels(source="database")
Record: TypeAlias = ConsumerRecord[bytes, bytes]


class Stale(Exception):
    """Ownership changed while the batch was prepared: drop it (it will be redelivered)."""


@dataclass(frozen=True, slots=True)
class DbPart:
    """One batch's share of a database write; ``expected`` is the last sequence per
    instrument-day it was classified against (the database checks it)."""

    generation: int
    ticks: Sequence[Tick]
    days: Sequence[int]
    statuses: Sequence[str]
    gaps: Sequence[Gap]
    expected: Mapping[Key, int | None]

    @property
    def size(self) -> int:
        return len(self.ticks)


@dataclass(frozen=True, slots=True)
class RingPart:
    """One batch's share of a ring append; ``modes`` and ``expect`` as in nadi.ring."""

    generation: int
    ticks: Sequence[Tick]
    days: Sequence[int]
    statuses: Sequence[str]
    modes: Sequence[int]
    expect: Sequence[int]

    @property
    def size(self) -> int:
        return len(self.ticks)


class _Recent:
    """Sequences this worker classified lately (the ticks themselves, so payloads are compared
    only when a duplicate shows up), to drop redundant packets and tell a redundant duplicate
    from a conflicting one. Keys are (token, day, sequence) packed in one int: exact, and
    unlike a tuple not tracked by the cyclic GC. Two dict generations bound the memory at
    about 2 x ``size`` entries."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self.current: dict[int, Tick] = {}
        self.previous: dict[int, Tick] = {}

    def rotate(self) -> None:
        if len(self.current) > self.size:
            self.previous, self.current = self.current, {}

    def clear(self) -> None:
        self.current, self.previous = {}, {}


@dataclass
class BatchReport:
    received: int = 0  # valid ticks handed to prepare()
    duplicates: int = 0
    conflicts: int = 0


@dataclass
class Prepared:
    """A classified batch: ``fresh`` ticks (redundant packets dropped) with their keys and
    statuses, the gaps they open, and the state they were classified against."""

    generation: int
    fresh: list[Tick]
    keys: list[Key]
    statuses: list[str]
    gaps: list[Gap]
    expected: dict[Key, int | None]
    report: BatchReport = field(default_factory=BatchReport)

    @property
    def late(self) -> list[int]:
        return [i for i, s in enumerate(self.statuses) if s == LATE]

    def ring_part(self) -> RingPart:
        """Everything but LATE ticks: OK/STALE in order, RECOVERED (filling a gap of this
        batch) new to the database. Written before the database: the ring may run ahead of
        the database, never behind it."""
        idx = [i for i, s in enumerate(self.statuses) if s != LATE]
        statuses = [self.statuses[i] for i in idx]
        # The ring has every tick up to the state this batch was classified against (it is
        # written first, in order); the ring detects that Redis lost data by it.
        exp = self.expected
        expect = [-1 if (q := exp[self.keys[i]]) is None else q for i in idx]
        return RingPart(
            self.generation,
            [self.fresh[i] for i in idx],
            [self.keys[i][1] for i in idx],
            statuses,
            [IN_ORDER if s in IN_ORDER_STATUSES else NEW_LATE for s in statuses],
            expect,
        )

    def db_part(self) -> DbPart:
        return DbPart(
            self.generation,
            self.fresh,
            [k[1] for k in self.keys],
            self.statuses,
            self.gaps,
            self.expected,
        )

    def late_part(self, written: WriteResult) -> RingPart:
        """LATE ticks, once the database settled them: each goes in with its stored status,
        as new (inserted now) or already stored (the ring decides by its floor)."""
        idx = self.late
        return RingPart(
            self.generation,
            [self.fresh[i] for i in idx],
            [self.keys[i][1] for i in idx],
            [o.status for o in written.late],
            [NEW_LATE if o.stored_now else STORED_LATE for o in written.late],
            [-1] * len(idx),
        )


class BatchProcessor:
    """Owns the classification memory; the pool, ring writer and producer belong to the
    worker."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        ring: RingWriter,
        producer: AIOKafkaProducer,
        *,
        mark_dirty: bool,
    ) -> None:
        self.s = settings
        self.pool = pool
        self.ring = ring
        self.producer = producer
        self.mark_dirty = mark_dirty
        self.codec = TickCodec(
            max_bytes=settings.max_message_bytes,
            max_future_skew_s=settings.max_future_skew_s,
            max_age_s=settings.max_tick_age_s,
        )
        self.recent = _Recent()
        self.last: dict[Key, int | None] = {}
        self.generation = 0
        self.known_tokens: frozenset[int] | None = None

    def reset(self) -> None:
        """Forget the memory: ownership changed or a prepared batch was abandoned."""
        self.generation += 1
        self.recent.clear()
        self.last.clear()

    def decode(self, records: Sequence[Record]) -> tuple[list[Tick], list[tuple[Record, Rejected]]]:
        good: list[Tick] = []
        bad: list[tuple[Record, Rejected]] = []
        now = time.time_ns()
        decode = self.codec.decode
        for r in records:
            try:
                good.append(decode(r.value, r.key, now))
            except Rejected as e:
                bad.append((r, e))
        return good, bad

    async def prepare(self, ticks: Sequence[Tick]) -> Prepared:
        """Drop redundant packets and classify the rest; no durable effect but the ring
        check of instrument-days touched for the first time."""
        generation = self.generation
        report = BatchReport(received=len(ticks))
        unique, keys = self._dedup_in_memory(ticks, report)
        try:
            unknown = [k for k in dict.fromkeys(keys) if k not in self.last]
            if unknown:
                _STATE_DB.inc()
                loaded = await self._load(unknown)
                if generation != self.generation:
                    raise Stale
                self.last.update(loaded)
            else:
                _STATE_MEMORY.inc()
        except BaseException:
            # The batch's sequences were remembered as taken; a retry must see them again.
            self.recent.clear()
            raise
        last = self.last
        expected = {k: last[k] for k in dict.fromkeys(keys)}
        cls = classify(unique, expected, keys)
        # From here on, synchronously: later batches see this one as if it were written.
        last.update(cls.last)
        if len(last) > 200_000:  # old trading days pile up in a long-lived worker
            last.clear()
            last.update(cls.last)
        return Prepared(generation, unique, keys, cls.statuses, cls.gaps, expected, report)

    async def _load(self, keys: Sequence[Key]) -> dict[Key, int | None]:
        """The database's last sequence of each instrument-day, and the ring made to agree
        with it (a ring behind the database is restarted; logged and counted)."""
        state = await load_state(self.pool, keys)
        for c in await self.ring.check(state):
            if c.outcome == AHEAD:
                # Normal after a crash (the ring is written first); also a database restored
                # from an older dump. Kept: the bitmap keeps redelivered ticks out.
                log.info(
                    "ring ahead of the database; kept",
                    instrument_token=c.token,
                    day=c.day,
                    db_last=state.get((c.token, c.day)),
                )
                metrics.RING_AHEAD.inc()
                continue
            _ring_restarted(
                c,
                "redis state discarded: ring restarted after the database's last sequence",
                db_last=state.get((c.token, c.day)),
            )
        return state

    async def publish_rejects(self, rejects: Sequence[tuple[Record, Rejected]]) -> None:
        """Dead-letter the rejects; returns once Kafka acknowledged them all."""
        await dlq.publish(self.producer, self.s.topic_dlq, rejects)

    async def append_ring(self, parts: Sequence[RingPart]) -> list[list[str | None]]:
        """Append the parts of several batches to the ring in one call, in order; returns
        each part's ring offsets (None where a tick was not appended)."""
        offsets, restarted = await self.ring.append_expecting(
            [t for q in parts for t in q.ticks],
            [d for q in parts for d in q.days],
            [s for q in parts for s in q.statuses],
            [m for q in parts for m in q.modes],
            [e for q in parts for e in q.expect],
        )
        for c in restarted:
            _ring_restarted(c, "redis lost ring state while the worker ran: ring restarted")
        out: list[list[str | None]] = []
        at = 0
        for q in parts:
            out.append(offsets[at : at + len(q.ticks)])
            at += len(q.ticks)
        return out

    async def write_db(self, parts: Sequence[DbPart]) -> list[WriteResult]:
        """Write the parts of several batches in one transaction, in order (they were
        classified in that order, so together they are one valid batch, checked against the
        state the first of them saw). A merged write's counts are reported on its last part;
        LATE outcomes go back to their own part."""
        if len(parts) == 1:
            q = parts[0]
            return [await self._write_db(q.ticks, q.days, q.statuses, q.gaps, q.expected)]
        expected: dict[Key, int | None] = {}
        for q in parts:
            for k, v in q.expected.items():
                expected.setdefault(k, v)
        w = await self._write_db(
            [t for q in parts for t in q.ticks],
            [d for q in parts for d in q.days],
            [s for q in parts for s in q.statuses],
            [g for q in parts for g in q.gaps],
            expected,
        )
        out: list[WriteResult] = []
        at = 0
        for i, q in enumerate(parts):
            n = sum(1 for s in q.statuses if s == LATE)
            mine = w.late[at : at + n]
            at += n
            last = i == len(parts) - 1
            out.append(
                dataclasses.replace(w, late=mine) if last else WriteResult(0, 0, 0, 0, 0, 0, mine)
            )
        return out

    async def _write_db(
        self,
        ticks: Sequence[Tick],
        days: Sequence[int],
        statuses: Sequence[str],
        gaps: Sequence[Gap],
        expected: Mapping[Key, int | None],
    ) -> WriteResult:
        if not ticks:
            return WriteResult(0, 0, 0, 0, 0, 0)
        metrics.DB_TRANSACTIONS.inc()
        async with self.pool.acquire() as conn:
            return await write_batch(
                conn, ticks, days, statuses, gaps, mark_dirty=self.mark_dirty, expected=expected
            )

    def observe(self, p: Prepared, written: WriteResult) -> None:
        metrics.TICKS_STORED.inc(written.inserted)
        metrics.STALE.inc(written.stale)
        metrics.RECOVERED.inc(written.recovered)
        metrics.GAPS.inc(written.gaps_new)
        metrics.GAPS_CLOSED.inc(written.gaps_closed)
        dup_db = len(written.late) - sum(1 for o in written.late if o.stored_now)
        if dup_db > 0:
            _DUP_DB.inc(dup_db)
        if self.known_tokens is not None:
            unknown = sum(1 for t in p.fresh if t.instrument_token not in self.known_tokens)
            if unknown:
                metrics.UNKNOWN_INSTRUMENT.inc(unknown)

    def _dedup_in_memory(
        self, ticks: Sequence[Tick], report: BatchReport
    ) -> tuple[list[Tick], list[Key]]:
        """Drop packets this worker has seen lately (this batch included) and remember the
        rest at once: a later batch is prepared only after this one, so it sees them."""
        unique: list[Tick] = []
        keys: list[Key] = []
        recent = self.recent
        cur, prev = recent.current, recent.previous
        dups = 0
        for t in ticks:
            day = (t.exchange_ts // NS + IST_OFFSET_S) // 86_400  # trading_day_ordinal, inlined
            k = (((t.instrument_token << 20) | day) << 64) | t.sequence_id
            seen = cur.get(k) or prev.get(k)
            if seen is not None:
                dups += 1
                if seen.payload_fingerprint() != t.payload_fingerprint():
                    self._conflict(t, seen.feed, report)
                continue
            cur[k] = t
            unique.append(t)
            keys.append((t.instrument_token, day))
        recent.rotate()
        report.duplicates += dups
        _DUP_MEMORY.inc(dups)
        return unique, keys

    def _conflict(self, dropped: Tick, kept_feed: str | None, report: BatchReport) -> None:
        report.conflicts += 1
        metrics.CONFLICTS.inc()
        log.warning(
            "sequence conflict: kept the first payload",
            instrument_token=dropped.instrument_token,
            sequence_id=dropped.sequence_id,
            kept_feed=kept_feed,
            other_feed=dropped.feed,
        )


def _ring_restarted(c: RingCheck, event: str, **extra: object) -> None:
    """Log and count a ring that Redis lost or rolled back (behind the database or the
    worker), restarted by the ring script; one place for both ways it is found."""
    reason = "ring_behind" if c.outcome == BEHIND else "ring_lost"
    log.warning(event, reason=reason, instrument_token=c.token, day=c.day, **extra)
    metrics.REDIS_STATE_DISCARDED.labels(reason=reason).inc()
