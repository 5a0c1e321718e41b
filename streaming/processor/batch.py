"""One batch through the MarketDataProcessor: decode, dedup, sequence, persist + ring.

``BatchProcessor.process`` is idempotent: run it again on the same records (after a failure or
a redelivery) and the database, the ring and the Redis state end up the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from nadi import metrics
from nadi.codec import Rejected, TickCodec
from nadi.db.tick_writer import WriteResult, write_batch
from nadi.logs import get_logger
from nadi.ring import RingWriter
from nadi.sequence import Gap, classify
from nadi.settings import Settings
from nadi.tick import Tick
from nadi.tick_state import Key, TickState
from streaming.processor import dlq

log = get_logger(__name__)
Record = ConsumerRecord[bytes, bytes]


class _RecentPayloads:
    """Fingerprints of recently stored sequences, to tell a redundant duplicate from a
    conflicting one. Two generations of a dict bound the memory (about 2 x ``size`` entries)."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self.current: dict[tuple[int, int, int], tuple[object, ...]] = {}
        self.previous: dict[tuple[int, int, int], tuple[object, ...]] = {}

    def get(self, k: tuple[int, int, int]) -> tuple[object, ...] | None:
        return self.current.get(k) or self.previous.get(k)

    def put_many(self, ticks: Sequence[Tick], keys: Sequence[Key]) -> None:
        cur = self.current
        for t, k in zip(ticks, keys, strict=True):
            cur[(k[0], k[1], t.sequence_id)] = t.payload_fingerprint()
        if len(self.current) > self.size:
            self.previous, self.current = self.current, {}


@dataclass
class BatchReport:
    received: int = 0  # valid ticks handed to persist()
    duplicates: int = 0
    conflicts: int = 0
    written: WriteResult | None = None
    ring_appended: int = 0
    seconds: float = 0.0


class BatchProcessor:
    """Owns nothing: the pool, Redis client and producer belong to the worker."""

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
        self.recent = _RecentPayloads()
        self.known_tokens: frozenset[int] | None = None

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

    async def publish_rejects(self, rejects: Sequence[tuple[Record, Rejected]]) -> None:
        """Dead-letter the rejects; returns once Kafka acknowledged them all."""
        await dlq.publish(self.producer, self.s.topic_dlq, rejects)

    async def persist(self, ticks: Sequence[Tick]) -> BatchReport:
        """Dedup, sequence and write valid ticks to TimescaleDB and the ring together."""
        t0 = time.perf_counter()
        report = BatchReport(received=len(ticks))
        unique, keys = self._dedup_in_batch(ticks, report)
        persisted, last = await self.state.load(keys, [t.sequence_id for t in unique])
        fresh: list[Tick] = []
        fresh_keys: list[Key] = []
        for t, key, done in zip(unique, keys, persisted, strict=True):
            if done:
                self._count_duplicate(t, key, "redis", report)
            else:
                fresh.append(t)
                fresh_keys.append(key)
        await self._fill_unknown_state(fresh_keys, last)
        cls = classify(fresh, last, fresh_keys)
        days = [k[1] for k in fresh_keys]
        results = await asyncio.gather(
            self._write(fresh, days, cls.statuses, cls.gaps),
            self.ring.append(fresh, days, cls.statuses),
            return_exceptions=True,  # both finish before we look: no orphaned task
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        written, offsets = results
        assert isinstance(written, WriteResult) and isinstance(offsets, list)
        report.written = written
        report.ring_appended = sum(1 for o in offsets if o is not None)
        by_key: dict[Key, list[int]] = {}
        for t, key in zip(fresh, fresh_keys, strict=True):
            by_key.setdefault(key, []).append(t.sequence_id)
        await self.state.commit(by_key, cls.last)
        self.recent.put_many(fresh, fresh_keys)
        self._observe(report, fresh)
        report.seconds = time.perf_counter() - t0
        return report

    def _dedup_in_batch(
        self, ticks: Sequence[Tick], report: BatchReport
    ) -> tuple[list[Tick], list[Key]]:
        first: dict[tuple[int, int, int], Tick] = {}
        unique: list[Tick] = []
        keys: list[Key] = []
        for t in ticks:
            day = t.trading_day_ordinal
            k = (t.instrument_token, day, t.sequence_id)
            seen = first.get(k)
            if seen is None:
                first[k] = t
                unique.append(t)
                keys.append((t.instrument_token, day))
            else:
                report.duplicates += 1
                metrics.DUPLICATES.labels(stage="batch").inc()
                if seen.payload_fingerprint() != t.payload_fingerprint():
                    self._conflict(seen, t, report)
        return unique, keys

    def _count_duplicate(self, t: Tick, key: Key, stage: str, report: BatchReport) -> None:
        report.duplicates += 1
        metrics.DUPLICATES.labels(stage=stage).inc()
        kept = self.recent.get((key[0], key[1], t.sequence_id))
        if kept is not None and kept != t.payload_fingerprint():
            report.conflicts += 1
            metrics.CONFLICTS.inc()
            log.warning(
                "sequence conflict: kept the first payload",
                instrument_token=t.instrument_token,
                sequence_id=t.sequence_id,
                feed=t.feed,
            )

    def _conflict(self, kept: Tick, other: Tick, report: BatchReport) -> None:
        report.conflicts += 1
        metrics.CONFLICTS.inc()
        log.warning(
            "sequence conflict: kept the first payload",
            instrument_token=kept.instrument_token,
            sequence_id=kept.sequence_id,
            kept_feed=kept.feed,
            other_feed=other.feed,
            kept_price=kept.last_price,
            other_price=other.last_price,
        )

    async def _fill_unknown_state(self, keys: Sequence[Key], last: dict[Key, int | None]) -> None:
        """Where Redis has no state for an (instrument, day), ask the database (Redis may have
        been flushed); only an instrument-day with no stored tick starts a new count."""
        unknown = [k for k in set(keys) if last.get(k) is None]
        if not unknown:
            return
        from datetime import date

        rows = await self.pool.fetch(
            """SELECT k.token, k.day,
                      (SELECT max(t.sequence_id) FROM ticks t
                        WHERE t.instrument_token = k.token
                          AND t.exchange_ts >= (k.day::timestamp AT TIME ZONE 'Asia/Kolkata')
                          AND t.exchange_ts < ((k.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata'))
                 FROM unnest($1::bigint[], $2::date[]) AS k(token, day)""",
            [k[0] for k in unknown],
            [date.fromordinal(719_163 + k[1]) for k in unknown],
        )
        for token, day, max_seq in rows:
            last[(token, day.toordinal() - 719_163)] = max_seq

    async def _write(
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
            dup_db = len(fresh) - w.inserted - w.late_dropped
            if dup_db > 0:
                metrics.DUPLICATES.labels(stage="database").inc(dup_db)
            if w.late_dropped:
                metrics.DUPLICATES.labels(stage="database").inc(w.late_dropped)
        if self.known_tokens is not None:
            unknown = sum(1 for t in fresh if t.instrument_token not in self.known_tokens)
            if unknown:
                metrics.UNKNOWN_INSTRUMENT.inc(unknown)
