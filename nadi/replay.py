"""The ReplayEngine: stored ticks of several instruments, merged in exchange-time order, at a
chosen speed, in flat memory.

How it reads: one keyset-paginated reader per instrument walks the unique index
``(instrument_token, exchange_ts, sequence_id)`` a chunk at a time
(``WHERE instrument_token = $1 AND (exchange_ts, sequence_id) > ($2, $3) AND exchange_ts < $4
ORDER BY exchange_ts, sequence_id LIMIT n``), so only one chunk per instrument is ever in memory
whatever the range, and each page is an index range scan that starts where the last one ended
(no OFFSET, no server-side cursor holding a connection and a snapshot for hours at speed 1).
The readers are merged with a heap keyed on ``(exchange_ts, instrument_token, sequence_id)``;
this triple is the total replay order and also the resume position (``after``).

Units: ``exchange_ts`` of a :class:`~nadi.tick.LiveTick` is UTC epoch nanoseconds (PostgreSQL
keeps microseconds, so it is always a multiple of 1000). ``speed`` is a time multiplier:
0 = as fast as possible, 1 = real time, N = N times faster.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
from confluent_kafka import KafkaError, Message, Producer

from nadi.codec import encode
from nadi.kafka_produce import produce_waiting_async
from nadi.tick import LiveTick
from nadi.times import to_datetime_us, to_epoch_us

_SEQ_MAX = 2**63 - 1  # larger than any sequence_id: "after every tick of this microsecond"
BATCH_TICKS = 2000  # ticks per yielded batch at speed 0 (amortises the async-generator hop)
# Rows held across all readers, in units of chunk_rows: with many instruments each reader's page
# shrinks (down to MIN_PAGE_ROWS) so memory stays bounded by the budget, not by the token count.
MEMORY_BUDGET_CHUNKS = 8
MIN_PAGE_ROWS = 100

# Columns in LiveTick field order (status, keyword-only, last): LiveTick(*r[:13], status=r[13]).
# exchange_ts leaves the server as epoch microseconds * 1000: a bigint decodes far faster
# in asyncpg than a timestamptz turned into a datetime and back into an int in Python.
# $5 is the instrument's exchange (from the master; the ticks table does not store it).
_PAGE_SQL = """
SELECT instrument_token, sequence_id,
       (extract(epoch FROM exchange_ts) * 1000000)::bigint * 1000,
       last_price, $5::text, last_qty, volume, oi, bid, ask, bid_qty, ask_qty, feed, status
FROM ticks
WHERE instrument_token = $1
  AND (exchange_ts, sequence_id) > ($2, $3)
  AND exchange_ts < $4
ORDER BY exchange_ts, sequence_id
LIMIT $6
"""

_EXCHANGES_SQL = (
    "SELECT instrument_token, exchange FROM instruments WHERE instrument_token = ANY($1)"
)


class _Reader:
    """One instrument's keyset pager: the current chunk and where the next one starts."""

    __slots__ = ("done", "exchange", "i", "key_seq", "key_us", "ticks", "token", "ts")

    def __init__(self, token: int, exchange: str | None, key_us: int, key_seq: int) -> None:
        self.token = token
        self.exchange = exchange
        self.key_us = key_us  # exclusive lower bound (exchange_ts µs, sequence_id)
        self.key_seq = key_seq
        self.ticks: list[LiveTick] = []
        self.ts: list[int] = []  # exchange_ts (ns) of ``ticks``, for bisect
        self.i = 0
        self.done = False

    async def fetch(self, pool: asyncpg.Pool, end: datetime, limit: int) -> bool:
        """Load the next chunk; False when the range is exhausted. A pool connection is held
        only for the query, so a slow (speed 1) replay never pins a connection for hours."""
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                _PAGE_SQL,
                self.token,
                to_datetime_us(self.key_us),
                self.key_seq,
                end,
                self.exchange,
                limit,
            )
        self.ticks = [LiveTick(*r[:13], status=r[13]) for r in rows]
        self.ts = [t.exchange_ts for t in self.ticks]
        self.i = 0
        if len(rows) < limit:
            self.done = True  # spare the final empty page
        if self.ticks:
            last = self.ticks[-1]
            self.key_us, self.key_seq = last.exchange_ts // 1000, last.sequence_id
        return bool(self.ticks)


def _lower_bound(token: int, start_us: int, after: tuple[int, int, int] | None) -> tuple[int, int]:
    """The exclusive (exchange_ts µs, sequence_id) keyset start of ``token``.

    ``after`` = (exchange_ts ns, instrument_token, sequence_id) is a position in the merged
    order; for this token it means ``(ts, token, seq) > after``, i.e. strictly after ``ts`` for a
    smaller token, from ``ts`` inclusive for a larger one, and after ``(ts, seq)`` for the same.
    """
    key = (start_us, -1)  # start is inclusive and sequence ids are >= 0
    if after is None:
        return key
    a_ns, a_tok, a_seq = after
    a_us, frac = divmod(a_ns, 1000)
    if frac:  # between two stored microseconds: everything at a_us is before it
        pos = (a_us, _SEQ_MAX)
    elif token < a_tok:
        pos = (a_us, _SEQ_MAX)
    elif token > a_tok:
        pos = (a_us - 1, _SEQ_MAX)  # i.e. exchange_ts >= a_us
    else:
        pos = (a_us, a_seq)
    return max(key, pos)


class ReplayEngine:
    """Replays stored ticks (DESIGN.md section 7, ``nadi replay``, the Dagster replay job).

    ``chunk_rows`` is the keyset page size per instrument; memory holds at most one page per
    instrument, and at most about ``MEMORY_BUDGET_CHUNKS * chunk_rows`` ticks in all.
    """

    def __init__(self, pool: asyncpg.Pool, *, chunk_rows: int = 5000) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        self._pool = pool
        self._chunk_rows = chunk_rows

    async def batches(
        self,
        tokens: Sequence[int],
        start: datetime,
        end: datetime,
        *,
        speed: float = 0.0,
        after: tuple[int, int, int] | None = None,
    ) -> AsyncIterator[list[LiveTick]]:
        """Ticks of ``tokens`` with ``start <= exchange_ts < end`` in merged order, as lists.

        The fast path for writers (NDJSON, Kafka): one async hop per batch, not per tick.
        ``after`` resumes strictly after a (exchange_ts ns, instrument_token, sequence_id)
        position, e.g. the last tick a WebSocket client has.
        """
        if speed < 0:
            raise ValueError("speed must be >= 0")
        merged = self._merge(tokens, start, end, after)
        if speed == 0:
            async for batch in merged:
                yield batch
            return
        # Paced: each tick is due at wall0 + (ts - ts0) / speed, computed from the first tick
        # every time (never from the previous sleep), so sleep overshoot does not accumulate.
        wall0 = ts0 = 0.0
        first = True
        async for batch in merged:
            if first:
                wall0, ts0, first = time.monotonic(), batch[0].exchange_ts, False
            i, n = 0, len(batch)
            while i < n:
                now = time.monotonic()
                # Everything already due (within 1 ms: finer than asyncio's timer) goes now.
                horizon = ts0 + (now - wall0 + 0.001) * speed * 1e9
                j = i
                while j < n and batch[j].exchange_ts <= horizon:
                    j += 1
                if j > i:
                    yield batch[i:j]
                    i = j
                    continue
                due = wall0 + (batch[i].exchange_ts - ts0) / (speed * 1e9)
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def catch_up(
        self, token: int, after_ns: int, after_seq: int, end: datetime | None = None
    ) -> AsyncIterator[list[LiveTick]]:
        """WebSocket catch-up: ticks of one instrument strictly after (exchange_ts ns,
        sequence_id), up to ``end`` (exclusive; default now + 1 day, i.e. all stored), in batches.
        Pass the position of the last tick the client has (or ``since`` in ns with
        ``after_seq=-1`` to include ticks at exactly that instant)."""
        stop = end or datetime.now(UTC) + timedelta(days=1)
        start = to_datetime_us(after_ns // 1000)
        async for batch in self.batches([token], start, stop, after=(after_ns, token, after_seq)):
            yield batch

    async def _merge(
        self,
        tokens: Sequence[int],
        start: datetime,
        end: datetime,
        after: tuple[int, int, int] | None,
    ) -> AsyncIterator[list[LiveTick]]:
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        uniq = sorted(set(tokens))
        if not uniq or start >= end:
            return
        async with self._pool.acquire() as conn:
            exchanges: dict[int, str] = dict(await conn.fetch(_EXCHANGES_SQL, uniq))
        start_us = to_epoch_us(start)
        readers: list[_Reader] = []
        for tok in uniq:
            key_us, key_seq = _lower_bound(tok, start_us, after)
            readers.append(_Reader(tok, exchanges.get(tok), key_us, key_seq))
        limit = max(
            min(self._chunk_rows, MIN_PAGE_ROWS),
            min(self._chunk_rows, self._chunk_rows * MEMORY_BUDGET_CHUNKS // len(readers)),
        )
        # First chunks concurrently (one connection each, briefly): start-up latency matters
        # to a WebSocket catch-up over many instruments.
        have = await asyncio.gather(*(r.fetch(self._pool, end, limit) for r in readers))
        heap = [
            (r.ts[0], r.token, k) for k, (r, ok) in enumerate(zip(readers, have, strict=True)) if ok
        ]
        heapq.heapify(heap)
        out: list[LiveTick] = []
        while heap:
            _, tok, k = heap[0]
            r = readers[k]
            if len(heap) == 1:
                stop = len(r.ticks)  # alone: the whole chunk is in order
            else:
                # Emit the run of r that sorts before the runner-up's head in one slice.
                nts, ntok, _ = heap[1] if len(heap) == 2 or heap[1] < heap[2] else heap[2]
                stop = (bisect_right if tok < ntok else bisect_left)(r.ts, nts, r.i)
            out.extend(r.ticks[r.i : stop])
            r.i = stop
            if stop < len(r.ticks):
                heapq.heapreplace(heap, (r.ts[stop], tok, k))
            elif not r.done and await r.fetch(self._pool, end, limit):
                heapq.heapreplace(heap, (r.ts[0], tok, k))
            else:
                heapq.heappop(heap)
                r.ticks, r.ts = [], []
            if len(out) >= BATCH_TICKS:
                yield out
                out = []
        if out:
            yield out


async def replay_to_kafka(
    engine: ReplayEngine,
    tokens: Sequence[int],
    start: datetime,
    end: datetime,
    topic: str,
    bootstrap: str,
    speed: float = 0.0,
) -> int:
    """Produce the replay to ``topic``; returns the number of messages delivered.

    Raises RuntimeError if any message failed delivery (after librdkafka's own retries), so a
    Dagster run fails instead of reporting a partial replay as done. Idempotent producer: a
    broker retry never duplicates a message; a re-run of the whole replay does.
    """
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
        }
    )
    failed: list[str] = []
    delivered = 0

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        nonlocal delivered
        if err is not None:
            failed.append(str(err))
        else:
            delivered += 1

    async for batch in engine.batches(tokens, start, end, speed=speed):
        for t in batch:
            value = encode(t)
            key = str(t.instrument_token).encode()
            await produce_waiting_async(producer, topic, value, key, on_delivery)
        producer.poll(0)
    remaining = await asyncio.to_thread(producer.flush, 60.0)
    if failed or remaining:
        raise RuntimeError(
            f"replay to {topic}: {len(failed)} failed, {remaining} undelivered "
            f"(first error: {failed[0] if failed else 'flush timeout'})"
        )
    return delivered
