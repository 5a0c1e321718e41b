"""The MarketDataProcessor: one stateless worker of the consumer group.

Loop: ``getmany`` a batch -> decode -> dead-letter the bad -> persist the good (TimescaleDB and
the Redis ring together) -> commit the batch's offsets. Offsets are committed only after both
sinks are durable, so a crash at any instant means redelivery, never loss; every write is
idempotent, so redelivery never means duplicates. While a sink is down the worker pauses its
partitions and retries with backoff, polling only to stay in the group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import start_http_server
from tenacity import wait_exponential_jitter

from nadi import metrics
from nadi.codec import Rejected
from nadi.db.pool import create_pool
from nadi.db.tick_writer import WriteResult, init_connection
from nadi.logs import get_logger
from nadi.settings import Settings
from streaming.processor.batch import (
    BatchProcessor,
    DbPart,
    Prepared,
    Record,
    RingPart,
    Stale,
)
from streaming.processor.crash import CrashPoints
from streaming.processor.group_commit import GroupCommit, Part

log = get_logger(__name__)
T = TypeVar("T")
P = TypeVar("P", bound=Part)
R = TypeVar("R")


class _Abandoned(Exception):
    """The batch's partitions were revoked or the worker is stopping: leave it uncommitted."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: MarketDataProcessor) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the in-flight write finish and commit; one stuck in retries is abandoned (its
        # records go to the next owner uncommitted, which is safe). Prepared batches are
        # dropped and the caches reset: the partitions may be someone else's next.
        w = self.worker
        if w.crash is not None:
            w.crash.reach("in_rebalance")
        w.assigned -= revoked
        w.revoking = True
        try:
            if w.in_flight:
                await asyncio.wait([f.task for f in w.in_flight], timeout=w.revoke_wait_s)
        finally:
            if w.processor is not None:
                w.processor.reset()
            w.revoking = False

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.worker.crash is not None:
            self.worker.crash.reach("in_rebalance")
        self.worker.assigned |= assigned
        if self.worker.processor is not None:
            self.worker.processor.reset()
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))


class MarketDataProcessor:
    """A worker of the consumer group. Owns its Kafka clients, pool, Redis client, the tasks of
    the batches in flight and the group commits (database, ring, Redis state) they write
    through; ``stop()`` drains them and commits."""

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        revoke_wait_s: float = 20.0,
        max_in_flight: int = 256,
    ) -> None:
        self.s = settings
        self.crash = CrashPoints.parse(settings.fault)  # None unless a test asks for one
        self.topic = topic or settings.topic_ticks
        self.revoke_wait_s = revoke_wait_s
        self.revoking = False
        self.stop_event = asyncio.Event()
        self.batches = 0
        self.committed_records = 0
        self.assigned: set[TopicPartition] = set()
        # Batches being written, oldest first; each sink writes them in this order.
        self.in_flight: collections.deque[_Flight] = collections.deque()
        self.max_in_flight = max_in_flight  # batches; small ones are cheap to hold
        # Records held beyond what is committed: bounds memory however the batches come.
        self.max_in_flight_records = 8 * settings.batch_max_records
        self._in_flight_records = 0
        # Seconds the main loop waited, by cause: where a throughput shortfall comes from.
        self.waited = {"fetch": 0.0, "backpressure": 0.0}
        self._committable: dict[TopicPartition, int] = {}
        self._committable_records = 0
        self._commit_lock = asyncio.Lock()
        self.processor: BatchProcessor | None = None
        self._db: GroupCommit[DbPart, WriteResult] | None = None
        self._ring: GroupCommit[RingPart, list[str | None]] | None = None
        self._state: GroupCommit[Prepared, None] | None = None
        self._paused = 0

    async def run(self) -> None:
        """Consume until :meth:`stop` (or SIGTERM/SIGINT when installed) is called."""
        s = self.s
        pool = await create_pool(s, min_size=1, max_size=3, init=init_connection)
        redis_client = aioredis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=5)
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_wait_ms=5,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            max_poll_interval_ms=300_000,
        )
        await producer.start()
        try:
            mode = await pool.fetchval("SELECT mode FROM candle_mode")
            # Both editions: the API merges the raw tail of marked windows (issue 9), and a
            # continuous aggregate's watermark does not cover late or back-filled ticks.
            self.processor = BatchProcessor(s, pool, redis_client, producer, mark_dirty=True)
            self.processor.known_tokens = await self._known_tokens(pool)
            processor = self.processor

            async def write_many(parts: Sequence[DbPart]) -> list[WriteResult]:
                out = await self._retrying(
                    consumer, "db", functools.partial(processor.write_db, parts)
                )
                if self.crash is not None:
                    if len(parts) >= 2:
                        self.crash.reach("mid_group_commit")
                    self.crash.reach("after_db_commit")
                return out

            async def append_many(parts: Sequence[RingPart]) -> list[list[str | None]]:
                out = await self._retrying(
                    consumer, "ring", functools.partial(processor.append_ring, parts)
                )
                if self.crash is not None:
                    self.crash.reach("after_ring_write")
                return out

            self._db = GroupCommit(write_many, max_size=4 * s.batch_max_records)

            async def commit_states(parts: Sequence[Prepared]) -> list[None]:
                return await self._retrying(
                    consumer, "redis", functools.partial(processor.commit_states, parts)
                )

            # Redis state updates are merged too: with many small batches in flight, one
            # connection each would exhaust the client's pool.
            self._state = GroupCommit(commit_states, max_size=4 * s.batch_max_records)
            # One live entry per ring write: kept to a batch's size for the API's readers.
            self._ring = GroupCommit(append_many, max_size=s.batch_max_records)
            consumer.subscribe([self.topic], listener=_Rebalance(self))
            await consumer.start()
            log.info("processor started", topic=self.topic, group=s.group_id, candles=mode)
            try:
                await self._loop(consumer, self.processor, pool)
            finally:
                if self.in_flight:  # drain: finish and commit
                    await asyncio.wait([f.task for f in self.in_flight])
                await self._db.aclose()
                await self._ring.aclose()
                await self._state.aclose()
                await consumer.stop()  # leaves the group; nothing uncommitted is claimed
        finally:
            await producer.stop()
            await redis_client.aclose()
            await pool.close()
            log.info(
                "processor stopped",
                batches=self.batches,
                records=self.committed_records,
                db_transactions=self._db.transactions if self._db else 0,
                ring_appends=self._ring.transactions if self._ring else 0,
                waited_s={k: round(v, 2) for k, v in self.waited.items()},
                busy_s={
                    "db": round(self._db.busy_s, 2) if self._db else 0,
                    "ring": round(self._ring.busy_s, 2) if self._ring else 0,
                },
            )

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def _loop(
        self, consumer: AIOKafkaConsumer, processor: BatchProcessor, pool: asyncpg.Pool
    ) -> None:
        last_refresh = time.monotonic()
        while not self.stop_event.is_set():
            w0 = time.perf_counter()
            batch: dict[TopicPartition, list[Record]] = await consumer.getmany(
                timeout_ms=100, max_records=self.s.batch_max_records
            )
            self.waited["fetch"] += time.perf_counter() - w0
            prepared = None
            rejects: list[tuple[Record, Rejected]] = []
            t0 = time.perf_counter()
            if batch:
                records = [r for recs in batch.values() for r in recs]
                ticks, rejects = processor.decode(records)
                if self.crash is not None:
                    self.crash.reach("after_decode")
                try:
                    # Overlaps with the previous batch's write (the pending task).
                    prepared = await self._retrying(
                        consumer, "redis", functools.partial(processor.prepare, ticks)
                    )
                except (_Abandoned, Stale):
                    prepared = None
            while self.in_flight and self.in_flight[0].task.done():
                self._in_flight_records -= self.in_flight.popleft().records
            if prepared is not None and prepared.generation == processor.generation:
                prev = self.in_flight[-1] if self.in_flight else None
                flight = _Flight.new(len(records))
                flight.task = asyncio.create_task(
                    self._write_and_commit(
                        consumer, processor, prepared, rejects, batch, t0, prev, flight
                    )
                )
                self.in_flight.append(flight)
                self._in_flight_records += flight.records
            while self.in_flight and (
                len(self.in_flight) >= self.max_in_flight
                or self._in_flight_records >= self.max_in_flight_records
            ):
                # Backpressure: bounded batches and records beyond what is committed.
                w0 = time.perf_counter()
                await asyncio.wait({self.in_flight[0].task})
                self.waited["backpressure"] += time.perf_counter() - w0
                self._in_flight_records -= self.in_flight.popleft().records
            if time.monotonic() - last_refresh > 60:
                last_refresh = time.monotonic()
                with contextlib.suppress(Exception):
                    processor.known_tokens = await self._known_tokens(pool)

    async def _write_and_commit(
        self,
        consumer: AIOKafkaConsumer,
        processor: BatchProcessor,
        prepared: Prepared,
        rejects: list[tuple[Record, Rejected]],
        batch: dict[TopicPartition, list[Record]],
        t0: float,
        prev: _Flight | None,
        me: _Flight,
    ) -> None:
        """One batch: dead letters, then TimescaleDB and the ring together, each queued for
        its sink's group commit after the previous batch; the offsets after the previous
        commit. A batch whose predecessor was abandoned is abandoned too (its records come
        again)."""

        try:
            try:
                await self._retrying(
                    consumer, "dlq", functools.partial(processor.publish_rejects, rejects)
                )
            except BaseException as e:
                for fut in (me.db, me.ring, me.ready):
                    _settle(fut, _Abandoned())
                raise _Abandoned from e
            if rejects and self.crash is not None:
                self.crash.reach("after_dlq_produce")
            await processor.write(
                prepared,
                db_write=functools.partial(self._queue, self._db, prev.db if prev else None, me.db),
                ring_write=functools.partial(
                    self._queue, self._ring, prev.ring if prev else None, me.ring
                ),
            )
            assert self._state is not None
            await self._state.submit(prepared)
            if prev is not None:
                await asyncio.shield(prev.ready)  # offsets become committable in batch order
        except _Abandoned:
            _settle(me.ready, _Abandoned())
            processor.reset()  # later prepared batches assumed this one would land
            return
        for tp, recs in batch.items():
            if recs:
                self._committable[tp] = recs[-1].offset + 1
        self._committable_records += sum(len(r) for r in batch.values())
        _settle(me.ready, None)
        await self._commit(consumer)
        n = sum(len(r) for r in batch.values())
        metrics.TICKS_IN.inc(n)
        metrics.BATCH_SIZE.observe(n)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        self._observe_lag(consumer, batch)

    async def _queue(
        self,
        group: GroupCommit[P, R] | None,
        after: asyncio.Future[None] | None,
        queued: asyncio.Future[None],
        part: P,
    ) -> R:
        """Hand a batch's part to a sink's group commit, after its predecessor's (batch
        order); ``queued`` tells the successor it may follow."""
        assert group is not None
        try:
            if after is not None:
                await asyncio.shield(after)  # raises if the predecessor was given up
            fut = group.submit(part)
        except BaseException as e:
            _settle(queued, _Abandoned())
            raise e if isinstance(e, _Abandoned) else _Abandoned() from e
        _settle(queued, None)
        return await fut

    async def _retrying(
        self, consumer: AIOKafkaConsumer, sink: str, fn: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``fn`` until it succeeds; meanwhile pause the partitions and back off."""
        wait = wait_exponential_jitter(multiplier=0.2, max=10)
        attempt = 0
        paused = False
        try:
            while True:
                try:
                    return await fn()
                except Stale:
                    raise
                except Exception as e:
                    attempt += 1
                    metrics.WRITE_RETRIES.labels(sink=sink).inc()
                    log.warning(
                        "batch step failed; retrying",
                        sink=sink,
                        attempt=attempt,
                        error=repr(e)[:300],
                    )
                    if not paused:
                        self._pause(consumer)
                        paused = True
                    deadline = time.monotonic() + wait(_RetryState(attempt))  # type: ignore[arg-type]
                    while time.monotonic() < deadline:
                        if self.stop_event.is_set() or self.revoking:
                            raise _Abandoned from e
                        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        finally:
            if paused:
                self._resume(consumer)

    def _pause(self, consumer: AIOKafkaConsumer) -> None:
        # Paused partitions fetch nothing, so nothing piles up in memory; the main loop keeps
        # calling getmany, which keeps this member in the group.
        self._paused += 1
        if self._paused == 1:
            consumer.pause(*consumer.assignment())
            metrics.PAUSED.set(1)

    def _resume(self, consumer: AIOKafkaConsumer) -> None:
        self._paused -= 1
        if self._paused == 0:
            consumer.resume(*consumer.assignment())
            metrics.PAUSED.set(0)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit every offset that is durable so far. One commit at a time; batches that
        became ready meanwhile ride along with the next one instead of queueing a commit each,
        so commit round trips don't throttle a stream of small batches."""
        async with self._commit_lock:
            if not self._committable:
                return  # an earlier caller committed ours too
            offsets, self._committable = self._committable, {}
            records, self._committable_records = self._committable_records, 0
            try:
                await consumer.commit(offsets)
                self.batches += 1
                self.committed_records += records
            except (CommitFailedError, KafkaError) as e:
                # The group moved on: the next owner gets these records again, and every
                # write above is idempotent, so redelivery is harmless.
                log.warning("commit failed; batch will be redelivered", error=repr(e)[:200])

    def _observe_lag(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Record]]
    ) -> None:
        for tp, recs in batch.items():
            hw = consumer.highwater(tp)
            if hw is not None and recs:
                metrics.LAG.labels(partition=str(tp.partition)).set(
                    max(0, hw - recs[-1].offset - 1)
                )

    @staticmethod
    async def _known_tokens(pool: asyncpg.Pool) -> frozenset[int]:
        rows = await pool.fetch("SELECT instrument_token FROM instruments")
        return frozenset(r[0] for r in rows)


@dataclass
class _Flight:
    """A batch being written: when it joined the database's and the ring's group commit
    (successors queue after it, keeping batch order), when its offsets became committable, and
    the task that ends with its offset commit."""

    db: asyncio.Future[None]  # queued for the database
    ring: asyncio.Future[None]  # queued for the ring
    ready: asyncio.Future[None]  # its offsets joined the committable set
    records: int  # Kafka records in the batch
    task: asyncio.Task[None] = field(init=False)

    @classmethod
    def new(cls, records: int) -> _Flight:
        loop = asyncio.get_running_loop()
        db, ring, ready = (loop.create_future() for _ in range(3))
        f = cls(db, ring, ready, records)
        for fut in (f.db, f.ring, f.ready):
            fut.add_done_callback(_retrieve)  # a failure is read by successors, if any
        return f


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class _RetryState:
    """The little of tenacity's RetryCallState that its wait strategies read."""

    def __init__(self, attempt: int) -> None:
        self.attempt_number = attempt


async def run_worker(settings: Settings) -> None:
    # Everything imported so far lives for the process: keep it out of every collection, and
    # collect the young generation less often (batches allocate in bursts of thousands).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1")
    worker = MarketDataProcessor(settings)
    worker.install_signal_handlers()
    await worker.run()
