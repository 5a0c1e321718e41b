"""One batch through the MarketDataProcessor, in two stages so batches can overlap:

``prepare`` (CPU and reads): decode, drop redundant packets, load sequence state, classify.
``write`` (durability): TimescaleDB and the Redis ring together, then the Redis state.

Batches are written strictly in order, so ``prepare`` of batch N+1 may run while batch N is
being written: it sees N's effect through the in-memory caches (the last sequence per
instrument and the recently classified sequences), which are authoritative for the partitions
this worker owns and are reset whenever ownership changes or a batch is abandoned.
``write`` is idempotent: repeated after a failure or a redelivery it changes nothing more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TypeAlias

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from nadi import metrics
from nadi.codec import Rejected, TickCodec
from nadi.db.tick_writer import WriteResult, write_batch
from nadi.logs import get_logger
from nadi.ring import IN_ORDER, IN_ORDER_STATUSES, NEW_LATE, STORED_LATE, RingWriter
from nadi.sequence import LATE, Gap, classify
from nadi.settings import Settings
from nadi.tick import IST_OFFSET_S, NS, Tick
from nadi.tick_state import Key, TickState
from streaming.processor import dlq

log = get_logger(__name__)
_DUP_MEMORY = metrics.DUPLICATES.labels(stage="memory")
_DUP_REDIS = metrics.DUPLICATES.labels(stage="redis")
_STATE_SKIPPED = metrics.STATE_LOADS.labels(source="memory")
_STATE_LOADED = metrics.STATE_LOADS.labels(source="redis")
_DUP_DB = metrics.DUPLICATES.labels(stage="database")
Record: TypeAlias = ConsumerRecord[bytes, bytes]
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@dataclass(frozen=True, slots=True)
class DbPart:
    """One batch's share of a database write."""

    generation: int
    ticks: Sequence[Tick]
    days: Sequence[int]
    statuses: Sequence[str]
    gaps: Sequence[Gap]

    @property
    def size(self) -> int:
        return len(self.ticks)


DbWriter = Callable[[DbPart], Awaitable[WriteResult]]


@dataclass(frozen=True, slots=True)
class RingPart:
    """One batch's (or its late ticks') share of a ring append; ``modes`` as in nadi.ring."""

    generation: int
    ticks: Sequence[Tick]
    days: Sequence[int]
    statuses: Sequence[str]
    modes: Sequence[int]

    @property
    def size(self) -> int:
        return len(self.ticks)


RingWriterFn = Callable[[RingPart], Awaitable[list[str | None]]]


class Stale(Exception):
    """Ownership changed while the batch was prepared: drop it (it will be redelivered)."""


def seq_key(token: int, day: int, seq: int) -> int:
    """(instrument, trading day, sequence) as one int: exact (token and sequence fit 64 bits,
    the day 20), and unlike a tuple not tracked by the cyclic GC, which matters for the
    hundreds of thousands of keys held in memory."""
    return (((token << 20) | day) << 64) | seq


class _Recent:
    """Sequences this worker classified lately (the ticks themselves, so payloads are compared
    only when a duplicate shows up), to drop redundant packets of in-flight batches and to tell
    a redundant duplicate from a conflicting one. Two dict generations bound the memory at about
    2 x ``size`` entries."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self.current: dict[int, Tick] = {}  # keyed by seq_key()
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
    written: WriteResult | None = None
    ring_appended: int = 0


@dataclass
class Prepared:
    generation: int
    fresh: list[Tick]
    keys: list[Key]
    statuses: list[str]
    gaps: list[Gap]
    last: dict[Key, int]
    report: BatchReport = field(default_factory=BatchReport)

    @property
    def size(self) -> int:
        return len(self.fresh)


class BatchProcessor:
    """Owns the caches; the pool, Redis client and producer belong to the worker."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis_client: aioredis.Redis,
        producer: AIOKafkaProducer,
        *,
        mark_dirty: bool,
    ) -> None:
        self.s = settings
        self.pool = pool
        self.producer = producer
        self.mark_dirty = mark_dirty
        self.codec = TickCodec(
            max_bytes=settings.max_message_bytes,
            max_future_skew_s=settings.max_future_skew_s,
            max_age_s=settings.max_tick_age_s,
        )
        self.state = TickState(redis_client, settings.dedup_ttl_s)
        self.ring = RingWriter(
            redis_client, maxlen=settings.ring_maxlen, ttl_s=settings.dedup_ttl_s
        )
        self.recent = _Recent()
        self.last: dict[Key, int] = {}
        self.generation = 0
        self.known_tokens: frozenset[int] | None = None

    def reset(self) -> None:
        """Forget the caches: ownership changed or a prepared batch was abandoned."""
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
        """Drop redundant packets and classify the rest; no durable effect."""
        generation = self.generation
        report = BatchReport(received=len(ticks))
        unique, keys = self._dedup_in_memory(ticks, report)
        try:
            return await self._classify(generation, unique, keys, report)
        except BaseException:
            # The batch's sequences were remembered as taken; a retry must see them again.
            self.recent.clear()
            raise

    async def _classify(
        self, generation: int, unique: list[Tick], keys: list[Key], report: BatchReport
    ) -> Prepared:
        persisted: Sequence[bool]
        redis_last: Mapping[Key, int | None]
        if self._all_ahead(unique, keys):
            # Steady state: every tick is past what this worker has already taken for its
            # instrument-day since it got the partition, so none can be persisted yet (the
            # database's unique key still has the final word): skip the Redis round trip.
            persisted, redis_last = [False] * len(unique), {}
            _STATE_SKIPPED.inc()
        else:
            persisted, redis_last = await self.state.load(keys, [t.sequence_id for t in unique])
            _STATE_LOADED.inc()
        fresh: list[Tick] = []
        fresh_keys: list[Key] = []
        for t, key, done in zip(unique, keys, persisted, strict=True):
            if done:
                report.duplicates += 1
                _DUP_REDIS.inc()
            else:
                fresh.append(t)
                fresh_keys.append(key)
        last: dict[Key, int | None] = {}
        for k in set(fresh_keys):
            last[k] = self.last[k] if k in self.last else redis_last.get(k)
        await self._fill_unknown_state(last)
        if generation != self.generation:
            raise Stale
        cls = classify(fresh, last, fresh_keys)
        # From here on, synchronously: later batches see this one as if it were written.
        self.last.update(cls.last)
        if len(self.last) > 200_000:  # old trading days pile up in a long-lived worker
            self.last.clear()
            self.last.update(cls.last)
        return Prepared(generation, fresh, fresh_keys, cls.statuses, cls.gaps, cls.last, report)

    async def publish_rejects(self, rejects: Sequence[tuple[Record, Rejected]]) -> None:
        """Dead-letter the rejects; returns once Kafka acknowledged them all."""
        await dlq.publish(self.producer, self.s.topic_dlq, rejects)

    async def write(
        self,
        p: Prepared,
        *,
        db_write: DbWriter | None = None,
        ring_write: RingWriterFn | None = None,
    ) -> BatchReport:
        """Make a prepared batch durable in TimescaleDB and the ring (concurrently). The
        worker passes its group commits as ``db_write`` and ``ring_write`` (they keep batch
        order, merge queued batches and retry); by default each part is written on its own.

        LATE ticks (behind the last sequence, from a reorder across batches or a redelivery
        after state was lost) go to the ring after the database has settled them: only then
        is it known whether each is new and with which status."""
        days = [k[1] for k in p.keys]
        late = [i for i, s in enumerate(p.statuses) if s == LATE]
        part = DbPart(p.generation, p.fresh, days, p.statuses, p.gaps)
        db = db_write or self._write_one
        ring = ring_write or self._append_one
        results: Sequence[object]
        if not late:
            modes = [IN_ORDER if s in IN_ORDER_STATUSES else NEW_LATE for s in p.statuses]
            results = await asyncio.gather(
                db(part),
                ring(RingPart(p.generation, p.fresh, days, p.statuses, modes)),
                return_exceptions=True,  # both finish before we look: no orphaned task
            )
        else:
            results = await self._write_with_late(p, part, late, db, ring)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        written, offsets = results
        assert isinstance(written, WriteResult) and isinstance(offsets, list)
        p.report.written = written
        p.report.ring_appended = sum(1 for o in offsets if o is not None)
        return p.report

    async def _write_with_late(
        self,
        p: Prepared,
        part: DbPart,
        late: list[int],
        db_write: DbWriter,
        ring_write: RingWriterFn,
    ) -> Sequence[object]:
        now = [i for i, s in enumerate(p.statuses) if s != LATE]
        days = part.days
        settled: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()

        async def db_all() -> WriteResult:
            try:
                w = await db_write(part)
            except BaseException:
                if not settled.done():
                    settled.set_exception(Stale())  # the ring's late part gives up with it
                raise
            settled.set_result(w)
            return w

        async def ring() -> list[str | None]:
            statuses = [p.statuses[i] for i in now]
            modes = [IN_ORDER if s in IN_ORDER_STATUSES else NEW_LATE for s in statuses]
            offsets = await ring_write(
                RingPart(p.generation, [p.fresh[i] for i in now], [days[i] for i in now],
                         statuses, modes)
            )  # fmt: skip
            outcomes = (await asyncio.shield(settled)).late
            return offsets + await ring_write(
                RingPart(
                    p.generation,
                    [p.fresh[i] for i in late],
                    [days[i] for i in late],
                    [o.status for o in outcomes],
                    [NEW_LATE if o.stored_now else STORED_LATE for o in outcomes],
                )
            )

        return await asyncio.gather(db_all(), ring(), return_exceptions=True)

    async def _append_one(self, part: RingPart) -> list[str | None]:
        return (await self.append_ring([part]))[0]

    async def append_ring(self, parts: Sequence[RingPart]) -> list[list[str | None]]:
        """Append the parts of several batches to the ring in one call, in order; returns
        each part's ring offsets (None where a tick was already in the ring)."""
        offsets = await self.ring.append(
            [t for q in parts for t in q.ticks],
            [d for q in parts for d in q.days],
            [s for q in parts for s in q.statuses],
            [m for q in parts for m in q.modes],
        )
        out: list[list[str | None]] = []
        at = 0
        for q in parts:
            out.append(offsets[at : at + len(q.ticks)])
            at += len(q.ticks)
        return out

    async def commit_state(self, p: Prepared) -> None:
        """After both sinks: mark the sequences persisted and advance the sequence state."""
        await self.commit_states([p])

    async def commit_states(self, parts: Sequence[Prepared]) -> list[None]:
        """:meth:`commit_state` of several batches in one Redis call (both updates are
        commutative, so batches may be merged and land in any order)."""
        by_key: dict[Key, list[int]] = {}
        last: dict[Key, int] = {}
        for p in parts:
            for t, key in zip(p.fresh, p.keys, strict=True):
                by_key.setdefault(key, []).append(t.sequence_id)
            for k, q in p.last.items():
                if q > last.get(k, -1):
                    last[k] = q
        await self.state.commit(by_key, last)
        for p in parts:
            self._observe(p.report, p.fresh)
        return [None] * len(parts)

    def _all_ahead(self, ticks: Sequence[Tick], keys: Sequence[Key]) -> bool:
        last = self.last
        for t, k in zip(ticks, keys, strict=True):
            q = last.get(k)
            if q is None or t.sequence_id <= q:
                return False
        return True

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
            day = (t.exchange_ts_ns // NS + IST_OFFSET_S) // 86_400  # trading_day_ordinal, inlined
            k = (((t.instrument_token << 20) | day) << 64) | t.sequence_id  # seq_key, inlined
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

    async def _fill_unknown_state(self, last: dict[Key, int | None]) -> None:
        """Where neither memory nor Redis knows an (instrument, day), ask the database (Redis
        may have been flushed); only an instrument-day with no stored tick starts a new count."""
        unknown = [k for k, v in last.items() if v is None]
        if not unknown:
            return
        rows = await self.pool.fetch(
            """SELECT k.token, k.day,
                      (SELECT max(t.sequence_id) FROM ticks t
                        WHERE t.instrument_token = k.token
                          AND t.exchange_ts >= (k.day::timestamp AT TIME ZONE 'Asia/Kolkata')
                          AND t.exchange_ts < ((k.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata'))
                 FROM unnest($1::bigint[], $2::date[]) AS k(token, day)""",
            [k[0] for k in unknown],
            [date.fromordinal(_EPOCH_ORDINAL + k[1]) for k in unknown],
        )
        for token, day, max_seq in rows:
            last[(token, day.toordinal() - _EPOCH_ORDINAL)] = max_seq

    async def _write_one(self, part: DbPart) -> WriteResult:
        return (await self.write_db([part]))[0]

    async def write_db(self, parts: Sequence[DbPart]) -> list[WriteResult]:
        """Write the parts of several batches in one transaction, in order (they were
        classified in that order, so together they are one valid batch). A merged write's
        counts are reported on its last part; LATE outcomes go back to their own part."""
        metrics.DB_TRANSACTIONS.inc()
        if len(parts) == 1:
            q = parts[0]
            return [await self._write_db(q.ticks, q.days, q.statuses, q.gaps)]
        w = await self._write_db(
            [t for q in parts for t in q.ticks],
            [d for q in parts for d in q.days],
            [s for q in parts for s in q.statuses],
            [g for q in parts for g in q.gaps],
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
    ) -> WriteResult:
        if not ticks:
            return WriteResult(0, 0, 0, 0, 0, 0)
        async with self.pool.acquire() as conn:
            return await write_batch(conn, ticks, days, statuses, gaps, mark_dirty=self.mark_dirty)

    def _observe(self, report: BatchReport, fresh: Sequence[Tick]) -> None:
        w = report.written
        if w is not None:
            metrics.TICKS_STORED.inc(w.inserted)
            metrics.STALE.inc(w.stale)
            metrics.RECOVERED.inc(w.recovered)
            metrics.GAPS.inc(w.gaps_new)
            metrics.GAPS_CLOSED.inc(w.gaps_closed)
            dup_db = len(fresh) - w.inserted
            if dup_db > 0:
                _DUP_DB.inc(dup_db)
        if self.known_tokens is not None:
            unknown = sum(1 for t in fresh if t.instrument_token not in self.known_tokens)
            if unknown:
                metrics.UNKNOWN_INSTRUMENT.inc(unknown)
