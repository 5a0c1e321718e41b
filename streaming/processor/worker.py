"""The MarketDataProcessor: one stateless worker of the consumer group.

Loop: ``getmany`` a batch -> decode -> prepare (classify against the state of the
instrument-days, see batch.py) -> hand its parts to the sinks -> commit its offsets once all
of it is durable. Per batch, in this order: the ring's in-order part, then the database
transaction (which records gaps, settles late ticks and advances ``ingest_state``), then the
ring's late part; dead letters alongside. The ring therefore never falls behind the database
except when Redis itself loses data, which the ring check on first touch detects.

Offsets are committed in batch order and only after every part is durable, so a crash at any
instant means redelivery, never loss; every write is idempotent (the database's unique key,
the ring's appended-sequence bitmap), so redelivery never means duplicates. While a sink is
down the worker pauses its partitions and retries with backoff, polling only to stay in the
group (sinks.py). The worker owns its Kafka clients, pool, Redis client, the sinks and the
tasks of the batches in flight; ``stop()`` drains them and commits.
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
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import start_http_server
from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from nadi.codec import Rejected
from nadi.db.pool import create_pool
from nadi.db.tick_writer import StateMoved, WriteResult, init_connection
from nadi.logs import get_logger
from nadi.redis_keys import DATABASES, LEGACY_LIVE, RedisKeys
from nadi.ring import RingWriter
from nadi.settings import Settings
from streaming.processor import metrics
from streaming.processor.batch import BatchProcessor, DbPart, Prepared, Record, RingPart, Stale
from streaming.processor.crash import CrashPoints
from streaming.processor.sinks import Abandoned, Flow, Sink

log = get_logger(__name__)
T = TypeVar("T")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: MarketDataProcessor) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the in-flight writes finish and commit; one stuck in retries is abandoned (its
        # records go to the next owner uncommitted, which is safe). The memory is reset: the
        # partitions may be someone else's next.
        w = self.worker
        if w.crash is not None:
            w.crash.reach("in_rebalance")
        w.assigned -= revoked
        flow = w.flow
        if flow is not None:
            flow.revoking = True
            flow.interrupt()
        try:
            if w.in_flight:
                await asyncio.wait([f.task for f in w.in_flight], timeout=w.revoke_wait_s)
        finally:
            if w.processor is not None:
                w.processor.reset()
            if flow is not None:
                flow.revoking = False

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        w = self.worker
        if w.crash is not None:
            w.crash.reach("in_rebalance")
        w.assigned |= assigned
        if w.processor is not None:
            w.processor.reset()
        if w.flow is not None:
            w.flow.assigned()
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))


@dataclass
class _Flight:
    """A batch being written: its parts' futures in the sinks, when its offsets became
    committable (successors commit after it), and the task that ends with its commit."""

    prepared: Prepared
    rejects: list[tuple[Record, Rejected]]
    offsets: dict[TopicPartition, int]  # next offset per partition once committed
    records: int  # Kafka records in the batch
    t0: float
    ring: asyncio.Future[list[str | None]]
    db: asyncio.Future[WriteResult]
    ready: asyncio.Future[None] = field(init=False)
    task: asyncio.Task[None] = field(init=False)

    def __post_init__(self) -> None:
        self.ready = asyncio.get_running_loop().create_future()
        for fut in (self.ring, self.db, self.ready):
            fut.add_done_callback(_retrieve)  # a failure is read by successors, if any


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class MarketDataProcessor:
    """A worker of the consumer group (see the module docstring)."""

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
        self._rewind = False  # the database refused a batch: read from the committed offsets
        # Set up by run(), for its duration.
        self.processor: BatchProcessor | None = None
        self.flow: Flow | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        """Consume until :meth:`stop` (or SIGTERM/SIGINT when installed) is called."""
        s = self.s
        # A database that is down or restarting at start-up is waited for, not fatal: a worker
        # respawned during a PostgreSQL restart used to exit here, leaving the group empty.
        pool = await self._starting(
            "pool",
            lambda: create_pool(s, dsn=s.ingest_dsn, min_size=1, max_size=3, init=init_connection),
        )
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
        self._consumer = consumer
        db: Sink[DbPart, WriteResult] | None = None
        ring_sink: Sink[RingPart, list[str | None]] | None = None
        await self._starting("kafka producer", producer.start)
        try:
            keys = await self._starting("redis keys", lambda: RedisKeys.load(pool))
            await self._claim_redis(redis_client, keys)
            ring = RingWriter(redis_client, keys, maxlen=s.ring_maxlen, ttl_s=s.dedup_ttl_s)
            # Both editions mark candle windows: the API merges the raw tail of marked windows
            # (issue 9), and a continuous aggregate's watermark misses late ticks.
            self.processor = processor = BatchProcessor(s, pool, ring, producer, mark_dirty=True)
            processor.known_tokens = await self._starting(
                "instruments", lambda: self._known_tokens(pool)
            )
            self.flow = flow = Flow(consumer, self.stop_event)
            crash = self.crash
            db = Sink(
                "db",
                processor.write_db,
                flow,
                max_size=4 * s.batch_max_records,
                fatal=(StateMoved,),
                after_write=None if crash is None else _db_crash_points(crash),
            )
            # One live entry per ring write: kept to a batch's size for the API's readers.
            ring_sink = Sink(
                "ring",
                processor.append_ring,
                flow,
                max_size=s.batch_max_records,
                after_write=None if crash is None else lambda _: crash.reach("after_ring_write"),
            )
            consumer.subscribe([self.topic], listener=_Rebalance(self))
            await self._starting("kafka consumer", consumer.start)
            log.info("processor started", topic=self.topic, group=s.group_id, redis_ns=keys.db_id)
            try:
                await self._loop(consumer, processor, flow, db, ring_sink, pool)
            finally:
                if self.in_flight:  # drain: finish and commit
                    await asyncio.wait([f.task for f in self.in_flight])
                await db.aclose()
                await ring_sink.aclose()
                await consumer.stop()  # leaves the group; nothing uncommitted is claimed
        finally:
            await producer.stop()
            await redis_client.aclose()
            await pool.close()
            log.info(
                "processor stopped",
                batches=self.batches,
                records=self.committed_records,
                db_transactions=db.transactions if db else 0,
                ring_appends=ring_sink.transactions if ring_sink else 0,
                waited_s={k: round(v, 2) for k, v in self.waited.items()},
                busy_s={
                    "db": round(db.busy_s, 2) if db else 0,
                    "ring": round(ring_sink.busy_s, 2) if ring_sink else 0,
                },
            )

    def stop(self) -> None:
        self.stop_event.set()
        if self.flow is not None:
            self.flow.interrupt()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def _loop(
        self,
        consumer: AIOKafkaConsumer,
        processor: BatchProcessor,
        flow: Flow,
        db: Sink[DbPart, WriteResult],
        ring: Sink[RingPart, list[str | None]],
        pool: asyncpg.Pool,
    ) -> None:
        last_refresh = time.monotonic()
        timeout_ms = self.s.batch_timeout_ms
        while not self.stop_event.is_set():
            if self._rewind:
                await self._read_again(consumer, processor)
            w0 = time.perf_counter()
            batch: dict[TopicPartition, list[Record]] = await consumer.getmany(
                timeout_ms=timeout_ms, max_records=self.s.batch_max_records
            )
            self.waited["fetch"] += time.perf_counter() - w0
            self._reap()
            if batch and not self._rewind:
                t0 = time.perf_counter()
                records = [r for recs in batch.values() for r in recs]
                ticks, rejects = processor.decode(records)
                if self.crash is not None:
                    self.crash.reach("after_decode")
                try:
                    # Overlaps with the writes of the batches in flight.
                    prepared = await flow.retry(
                        "state", functools.partial(processor.prepare, ticks)
                    )
                except (Abandoned, Stale):
                    prepared = None
                if (
                    prepared is not None
                    and prepared.generation == processor.generation
                    and not self._rewind
                ):
                    self._start(prepared, rejects, batch, len(records), t0, db, ring)
            while self.in_flight and (
                len(self.in_flight) >= self.max_in_flight
                or self._in_flight_records >= self.max_in_flight_records
            ):
                # Backpressure: bounded batches and records beyond what is committed.
                w0 = time.perf_counter()
                await asyncio.wait({self.in_flight[0].task})
                self.waited["backpressure"] += time.perf_counter() - w0
                self._reap()
            if time.monotonic() - last_refresh > 60:
                last_refresh = time.monotonic()
                with contextlib.suppress(Exception):
                    processor.known_tokens = await self._starting(
                        "instruments", lambda: self._known_tokens(pool)
                    )

    def _start(
        self,
        p: Prepared,
        rejects: list[tuple[Record, Rejected]],
        batch: dict[TopicPartition, list[Record]],
        records: int,
        t0: float,
        db: Sink[DbPart, WriteResult],
        ring: Sink[RingPart, list[str | None]],
    ) -> None:
        """Submit a prepared batch's parts (synchronously, so sinks see batches in order) and
        start the task that lands it."""
        ring_fut = ring.submit(p.ring_part())
        db_fut = db.submit(p.db_part(), after=ring_fut)
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}
        prev = self.in_flight[-1] if self.in_flight else None
        flight = _Flight(p, rejects, offsets, records, t0, ring_fut, db_fut)
        flight.task = asyncio.create_task(self._land(flight, prev, ring))
        self.in_flight.append(flight)
        self._in_flight_records += records

    def _reap(self) -> None:
        while self.in_flight and self.in_flight[0].task.done():
            self._in_flight_records -= self.in_flight.popleft().records

    async def _land(
        self, f: _Flight, prev: _Flight | None, ring: Sink[RingPart, list[str | None]]
    ) -> None:
        """Wait until the whole batch is durable (dead letters, ring, database, then the
        ring's late part), then commit its offsets after its predecessor's. A batch whose
        predecessor was abandoned is abandoned too (its records come again)."""
        processor = self.processor
        flow = self.flow
        assert processor is not None and flow is not None  # set for the duration of run()
        p = f.prepared
        try:
            if f.rejects:
                await flow.retry("dlq", lambda: processor.publish_rejects(f.rejects))
                if self.crash is not None:
                    self.crash.reach("after_dlq_produce")
            written = await f.db
            await f.ring
            if p.late:
                await ring.submit(p.late_part(written))
            if prev is not None:
                await asyncio.shield(prev.ready)  # offsets become committable in batch order
        except BaseException as e:
            _settle(f.ready, Abandoned())
            if isinstance(e, StateMoved):
                # Nothing of this generation lands any more (the sinks fail it); the main loop
                # starts no new batch until it has read the partitions again.
                if not self._rewind:
                    metrics.STATE_MOVED.inc()
                    log.warning("database refused a batch; reading again", error=str(e)[:300])
                self._rewind = True
            elif p.generation == processor.generation:
                processor.reset()  # later prepared batches assumed this one would land
            if not isinstance(e, (Abandoned, StateMoved, asyncio.CancelledError)):
                log.error("batch failed unexpectedly; left uncommitted", error=repr(e)[:300])
            return
        for tp, offset in f.offsets.items():
            self._committable[tp] = offset
        self._committable_records += f.records
        _settle(f.ready, None)
        processor.observe(p, written)
        await self._commit_offsets()
        metrics.TICKS_IN.inc(f.records)
        metrics.BATCH_SIZE.observe(f.records)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - f.t0)

    async def _read_again(self, consumer: AIOKafkaConsumer, processor: BatchProcessor) -> None:
        """After the database refused a batch: let the batches in flight fail, forget the
        memory and read every assigned partition again from its committed offset."""
        if self.in_flight:
            await asyncio.wait([f.task for f in self.in_flight])
        self._reap()
        processor.reset()
        for tp in list(consumer.assignment()):
            committed = await consumer.committed(tp)
            # A rebalance during an await here (a worker woken from a stall often is in one)
            # may revoke tp: its new owner reads it from the committed offset, nothing to do.
            if tp not in consumer.assignment():
                continue
            try:
                if committed is None or committed < 0:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, committed)
            except IllegalStateError:
                log.info("partition revoked while reading again", partition=tp.partition)
        self._rewind = False

    async def _commit_offsets(self) -> None:
        """Commit every offset that is durable so far. One commit at a time; batches that
        became ready meanwhile ride along with the next one instead of queueing a commit each,
        so commit round trips don't throttle a stream of small batches."""
        consumer = self._consumer
        assert consumer is not None  # set for the duration of run()
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
            for tp, offset in offsets.items():
                hw = consumer.highwater(tp)
                if hw is not None:
                    metrics.LAG.labels(partition=str(tp.partition)).set(max(0, hw - offset))

    async def _starting(self, step: str, fn: Callable[[], Awaitable[T]]) -> T:
        """A start-up step, retried with backoff until it succeeds or the worker stops."""

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("start-up step failed; retrying", step=step, error=repr(error)[:300])

        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.2, max=5, jitter=0.2),
            stop=lambda _: self.stop_event.is_set(),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity either returns or raises")

    @staticmethod
    async def _claim_redis(client: aioredis.Redis, keys: RedisKeys) -> None:
        """Register this database in Redis and log (and count) state of other databases or of
        the un-namespaced layout: never read, left to expire (another deployment may use
        it)."""
        try:
            await client.sadd(DATABASES, keys.db_id)
            members = await client.smembers(DATABASES)
            names = {m.decode() if isinstance(m, bytes) else m for m in members}
            others = sorted(names - {keys.db_id})
            legacy = await client.exists(LEGACY_LIVE)
        except Exception as e:  # Redis down at start-up: the sinks will retry; not fatal
            log.warning("could not check Redis for other databases' state", error=repr(e)[:200])
            return
        if others:
            log.warning(
                "redis holds state of other databases; ignored (keys are per database)",
                database=keys.db_id,
                others=others,
            )
            metrics.REDIS_STATE_DISCARDED.labels(reason="other_database").inc(len(others))
        if legacy:
            log.warning("redis holds un-namespaced (pre-0010) state; ignored")
            metrics.REDIS_STATE_DISCARDED.labels(reason="legacy_keys").inc()

    @staticmethod
    async def _known_tokens(pool: asyncpg.Pool) -> frozenset[int]:
        rows = await pool.fetch("SELECT instrument_token FROM instruments")
        return frozenset(r[0] for r in rows)


def _db_crash_points(crash: CrashPoints) -> Callable[[Sequence[DbPart]], None]:
    def after_write(parts: Sequence[DbPart]) -> None:
        if sum(1 for q in parts if q.size) >= 2:
            crash.reach("mid_group_commit")
        crash.reach("after_db_commit")

    return after_write


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
