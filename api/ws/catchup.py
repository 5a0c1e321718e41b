"""Catch-up of one subscription, paced by the client, then the switch to live (DESIGN.md 6).

Exactly once. The subscription is registered with the hub *before* anything is read, and parks
live ticks in its buffer while ``live`` is False. So every tick is either already in the ring
when catch-up reads it, or reaches the buffer afterwards (the processor appends to the ring and
to the live stream in one Lua call; key names from ``nadi.redis_keys.RedisKeys``). The switch
is one synchronous step (no ``await``): buffered ticks whose ring offset is above the last one
read are queued, ``live`` turns True with that offset as the subscription's ``floor``, and
``synced`` is queued with it. The hub may dispatch an entry after catch-up already read it from
the ring: once live, the subscription sends only ticks above its floor. Ring offsets increase
per instrument stream, so this de-duplication by offset is exact. If the buffer overflowed, the
ring is read again from the last entry read before switching.

Paced by the client. History (ring or database) is read a page at a time, and the next page
only once the connection's reliable lane is down to its low-water mark (``connection.py``):
a client that reads gets every tick of the history it asked for, however slowly it reads, and
a client that does not read holds at most a page or so of it in memory. History is never
subject to drop-oldest; only live ticks are.

Bounded reads. Every read (one XRANGE page, one database page) takes a permit of the process's
:class:`ReadLimiter` (``ws_catchup_concurrency``, FIFO, so a thundering herd of subscribers is
served in arrival order, page by page, round robin) and goes through the catch-up's own Redis
client, whose pool has exactly as many connections (a ``BlockingConnectionPool``: it waits,
never raises "too many connections"). No permit or connection is held while waiting for the
client to read.

Trim detection. After the first page, each ring page starts *at* the last entry read (XRANGE
inclusive) and must return it first: if it is gone, the ring was trimmed past the client (a
slow client, a long catch-up), and the missing ticks are read from the database, from the last
tick sent up to the ring's new first entry (exclusive), before the ring is read again from there.

``since`` forms:

* absent: live only; ``synced`` carries the ring's current last offset (ticks at or below it
  that the hub has not dispatched yet are dropped by the same de-duplication).
* a ring offset ``"<ms>-<n>"``: XRANGE from it, exclusive. If the ring was trimmed past it
  (its first entry is newer than the offset) ticks may be missing, so the subscription is
  refused with error ``since_expired``: resubscribe with an ISO-8601 ``since`` (e.g. the
  ``exchange_ts`` of the last tick held). There is no honest way to turn a trimmed
  arrival-time offset into an exchange-time position.
* an ISO-8601 time with an offset, T0 (inclusive, on ``exchange_ts``): ring ids are arrival
  times (ms), and a tick arrives at or after its exchange time unless the exchange clock is
  ahead of ours, by at most ``max_future_skew_s`` (larger is rejected at ingest). So the first
  entry with ``exchange_ts >= T0`` is found by scanning forward from id ``T0 - skew``; everything
  after it in ring order follows. When the ring's first entry F is newer than T0, the database
  is read first (ReplayEngine keyset pages) from T0 up to F's (exchange_ts, sequence_id),
  exclusive, then the ring from F inclusive. Ring entries after F that the database part
  already sent (late RECOVERED ticks with exchange_ts >= T0 and a position at or before the
  last database tick) are skipped; a trimmed F is the trim case above.

Database ticks have no ring offset (``"offset": null``). Positions compare on microseconds, the
resolution PostgreSQL keeps.

Ownership: :class:`CatchUp` (one per API process, built by ``api.ws.startup``) owns its Redis
client and closes it in :meth:`CatchUp.aclose`; each run is the subscription's task (owned by
the router's session), and cancelling it releases its permit and closes its database pager.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Final, cast

import asyncpg
import msgspec
import redis.asyncio as aioredis

from api.ws import protocol
from api.ws.connection import Chunk, Subscription
from api.ws.hub import Entries, parse_offset
from nadi.redis_keys import RedisKeys
from nadi.replay import BATCH_TICKS, ReplayEngine
from nadi.tick import LiveTick
from nadi.times import to_datetime_us, to_epoch_us

PAGE = 500  # ring entries per XRANGE (and per catch-up page sent)
DB_PAGE = BATCH_TICKS  # rows per database page: one keyset query per ReplayEngine batch
_OFFSET_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # ASCII digits (\d takes any script's)
_MAX_ID_PART = 2**64 - 1
EARLIEST_SINCE_US = 0  # 1970-01-01: nothing is stored before it

Key = tuple[int, int]  # (exchange_ts µs, sequence_id): an instrument's position in time order

# Ring position modes: what ``_Run.pos`` means for the next XRANGE.
LOOSE: Final = 0  # continue after pos (exclusive); pos need not be an entry
SENT: Final = 1  # pos is the last entry read: it must still be there (else trimmed)
NEXT: Final = 2  # pos is the next entry to send: it must still be there (else trimmed)


class _Head(msgspec.Struct):
    """The fields of a ring entry's LiveTick that catch-up needs (the rest is passed through)."""

    sequence_id: int
    exchange_ts: int  # UTC epoch ns


_head = msgspec.json.Decoder(_Head).decode


class SinceExpired(Exception):
    """The ring no longer holds everything after the client's offset."""


def parse_since(since: str, *, now_us: int, max_future_skew_s: float) -> str | datetime:
    """A ring offset (returned as is) or an aware datetime in [1970, now + skew]; ValueError
    (with the reason, for the client) otherwise."""
    if _OFFSET_RE.fullmatch(since):
        ms, _, seq = since.partition("-")
        if int(ms) > _MAX_ID_PART or int(seq) >= _MAX_ID_PART:
            raise ValueError("since: a ring offset is two 64-bit unsigned integers")
        return since
    if not since.isascii():
        raise ValueError("since: an ISO-8601 time with a UTC offset, or a ring offset")
    try:
        dt = datetime.fromisoformat(since)
    except ValueError:
        raise ValueError("since: an ISO-8601 time with a UTC offset, or a ring offset") from None
    if dt.tzinfo is None:
        raise ValueError("since: an ISO-8601 time needs a UTC offset (e.g. +05:30 or Z)")
    try:
        us = to_epoch_us(dt)
    except (OverflowError, ValueError):
        raise ValueError("since: out of range") from None
    if us < EARLIEST_SINCE_US:
        raise ValueError("since: before 1970-01-01")
    if us > now_us + int(max_future_skew_s * 1e6):
        raise ValueError("since: in the future")
    return dt


class ReadLimiter:
    """At most ``limit`` catch-up reads in flight (``async with limiter: await read``); waiters
    are served first come, first served (``asyncio.Semaphore`` queues them FIFO).
    ``in_flight``, ``peak`` and ``reads`` are for tests and metrics."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self.in_flight = 0
        self.peak = 0
        self.reads = 0

    async def __aenter__(self) -> None:
        await self._sem.acquire()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.reads += 1

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        self._sem.release()


class CatchUp:
    """Runs catch-ups for one API process. ``redis`` is the catch-up's own client (a pool of
    ``concurrency`` connections); ``pool`` the API's database pool (None: ring only)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        pool: asyncpg.Pool | None,
        *,
        concurrency: int,
        max_future_skew_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.limiter = ReadLimiter(concurrency)
        self.skew_ms = int(max_future_skew_s * 1000)

    @staticmethod
    def redis_client(url: str, concurrency: int) -> aioredis.Redis:
        """A client whose pool waits for a free connection instead of raising."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=concurrency, timeout=None
        )
        return aioredis.Redis(connection_pool=pool)

    async def aclose(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def run(self, sub: Subscription, since: str | datetime | None) -> None:
        """Catch ``sub`` up from ``since`` and switch it to live. Raises SinceExpired."""
        await _Run(self, sub).run(since)


class _Run:
    """The state of one catch-up: where in the ring it is and the last tick it sent."""

    def __init__(self, cu: CatchUp, sub: Subscription) -> None:
        self.cu = cu
        self.sub = sub
        self.conn = sub.conn
        self.ring = cu.keys.ring(sub.token)
        self.t0_us: int | None = None
        self.pos: str | None = None  # ring position; None: the ring's start
        self.mode: int = LOOSE
        self.after: Key | None = None  # greatest position sent so far
        self.skip_upto: Key | None = None  # ring entries at or below it came from the database

    async def _xrange(self, start: str, count: int) -> Entries:
        async with self.cu.limiter:
            return cast(Entries, await self.cu.redis.xrange(self.ring, start, "+", count=count))

    # ---- the run ---------------------------------------------------------------------------

    async def run(self, since: str | datetime | None) -> None:
        if since is None:
            async with self.cu.limiter:
                last = cast(Entries, await self.cu.redis.xrevrange(self.ring, "+", "-", count=1))
            self.pos = last[0][0].decode() if last else None
        elif isinstance(since, str):
            first = await self._first()
            # Trimming removes from the head and does not record what it removed, so the only
            # safe test is: the client's own entry must still be in the ring (or it is empty).
            if first is not None and parse_offset(first[0]) > parse_offset(since):
                raise SinceExpired(f"ring offset {since} is no longer in the ring")
            self.pos = since
        else:
            await self._start_at(since)
        while True:
            if not await self._ring_pass():
                await self._refill_from_db()
                continue
            if self.sub.overflow:  # live ticks were discarded from the buffer: the ring has them
                self.sub.overflow = False
                continue
            self._switch()
            return

    def _switch(self) -> None:
        """Buffered live ticks after the last one read, then live and ``synced``; no await."""
        sub, conn = self.sub, self.conn
        last_id = self.pos
        last = parse_offset(last_id) if last_id is not None else (-1, -1)
        offsets: list[tuple[int, int]] = []
        messages: list[bytes] = []
        for offset, message in sub.buffer:
            if offset > last:
                offsets.append(offset)
                messages.append(message)
                last = offset
        if messages:
            conn.push(Chunk(sub.token, offsets, messages), 0, sub.conflate)
            last_id = f"{last[0]}-{last[1]}"
        sub.buffer = []
        sub.floor = last  # the hub may not have dispatched what the ring already gave us
        sub.live = True
        conn.put_now(protocol.synced(sub.token, last_id))

    # ---- ring ------------------------------------------------------------------------------

    async def _ring_pass(self) -> bool:
        """Send ring entries after the position up to the current end, a page at a time as the
        client reads. False if the ring was trimmed past the position."""
        conn = self.conn
        while True:
            pos, mode = self.pos, self.mode
            if pos is None:
                start, count = "-", PAGE
            elif mode == LOOSE:
                start, count = "(" + pos, PAGE
            else:
                start, count = pos, PAGE + (mode == SENT)
            async with conn.history_gate:
                await conn.wait_history_room()
                page = await self._xrange(start, count)
            # No await from here to put_history: the gate's next holder sees this page queued.
            if pos is not None and mode != LOOSE:
                if not page or page[0][0].decode() != pos:
                    return False
            full = len(page) == count
            entries = page[1:] if mode == SENT and pos is not None else page
            messages: list[bytes] = []
            for entry_id, fields in entries:
                payload = fields[b"d"]
                if self._take(payload):
                    messages.append(protocol.tick_from_payload(entry_id, payload))
            if page:
                self.pos, self.mode = page[-1][0].decode(), SENT
            conn.put_history(messages)
            if not full:
                return True

    def _take(self, payload: bytes) -> bool:
        """Whether a ring entry is to be sent (not already sent from the database)."""
        h = _head(payload)
        key = (h.exchange_ts // 1000, h.sequence_id)
        skip = self.skip_upto
        if skip is not None and key <= skip and (self.t0_us is None or key[0] >= self.t0_us):
            return False
        if self.after is None or key > self.after:
            self.after = key
        return True

    async def _first(self) -> tuple[str, Key] | None:
        head = await self._xrange("-", 1)
        if not head:
            return None
        entry_id, fields = head[0]
        h = _head(fields[b"d"])
        return entry_id.decode(), (h.exchange_ts // 1000, h.sequence_id)

    # ---- since = time ----------------------------------------------------------------------

    async def _start_at(self, t0: datetime) -> None:
        """Position the run at T0: in the ring if it reaches back that far, else the database
        first, up to the ring's first entry."""
        t0_us = self.t0_us = to_epoch_us(t0)
        first = await self._first()
        if first is not None and first[1][0] <= t0_us:
            await self._find_start(t0_us)
            return
        await self._db_until(first)

    async def _find_start(self, t0_us: int) -> None:
        """The first ring entry with exchange_ts >= T0 (NEXT), or, if none yet, the last id
        scanned (LOOSE): whatever comes after it is wanted."""
        lo = f"{max(0, t0_us // 1000 - self.cu.skew_ms)}-0"
        start = lo
        last: str | None = None
        while True:
            page = await self._xrange(start, PAGE)
            for entry_id, fields in page:
                last = entry_id.decode()
                if _head(fields[b"d"]).exchange_ts // 1000 >= t0_us:
                    self.pos, self.mode = last, NEXT
                    return
            if len(page) < PAGE:
                break
            start = "(" + page[-1][0].decode()
        self.pos, self.mode = (last, SENT) if last is not None else (_before(lo), LOOSE)

    async def _refill_from_db(self) -> None:
        """The ring was trimmed past the position: the database from the last tick sent up to
        the ring's new first entry, then the ring from there."""
        if self.after is None and self.t0_us is None:
            raise SinceExpired("the ring was trimmed past this subscription's position")
        await self._db_until(await self._first())

    async def _db_until(self, first: tuple[str, Key] | None) -> None:
        """Database ticks after the last one sent (from T0 if none) up to ``first``'s position
        (exclusive; without a ring, up to now plus the allowed clock skew), then position the
        run at ``first`` (NEXT) or the ring's start."""
        await self._from_db(first[1] if first else None)
        self.skip_upto = self.after
        if first is None:
            self.pos, self.mode = None, LOOSE
        else:
            self.pos, self.mode = first[0], NEXT

    async def _from_db(self, stop: Key | None) -> None:
        pool = self.cu.pool
        if pool is None:
            return
        after, token, conn = self.after, self.sub.token, self.conn
        start_us = after[0] if after is not None else cast(int, self.t0_us)
        end_us = stop[0] + 1 if stop else (time.time_ns() // 1000 + self.cu.skew_ms * 1000)
        if end_us <= start_us:
            return
        engine = ReplayEngine(pool, chunk_rows=DB_PAGE)
        resume = None if after is None else (after[0] * 1000, token, after[1])
        pages = cast(
            AsyncGenerator[list[LiveTick], None],
            engine.batches(
                [token], to_datetime_us(start_us), to_datetime_us(end_us), speed=0.0, after=resume
            ),
        )
        async with contextlib.aclosing(pages):
            while True:
                async with conn.history_gate:
                    await conn.wait_history_room()
                    async with self.cu.limiter:
                        batch = await anext(pages, None)
                if batch is None:
                    return
                messages: list[bytes] = []
                for t in batch:
                    key = (t.exchange_ts // 1000, t.sequence_id)
                    if stop is not None and key >= stop:
                        conn.put_history(messages)
                        return
                    messages.append(protocol.tick_from_live(None, t))
                    self.after = key
                conn.put_history(messages)


def _before(entry_id: str) -> str | None:
    """The greatest stream id below ``entry_id`` (so an exclusive range starts at it)."""
    ms, seq = parse_offset(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{_MAX_ID_PART}"
    return None
