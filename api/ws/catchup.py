"""Catch-up of one subscription, then the switch to live (DESIGN.md section 6).

The subscription is registered with the hub *before* anything is read, and parks live ticks in
its buffer while ``live`` is False. So every tick is either already in the ring when catch-up
reads it, or reaches the buffer afterwards (the processor appends to the ring and to
``nadi:live`` in one Lua call). The switch is one synchronous step (no ``await``): buffered
ticks whose ring offset is above the last one sent are queued, ``live`` turns True, and
``synced`` is queued with that offset. Ring offsets increase per instrument stream, so this
de-duplication by offset is exact. If the buffer overflowed, the ring is simply read again
from the last offset sent before switching.

``since`` forms:

* absent: live only; ``synced`` carries the ring's current last offset (ticks at or below it
  that the hub has not dispatched yet are dropped by the same de-duplication).
* a ring offset ``"<ms>-<n>"``: XRANGE from it, exclusive. If the ring was trimmed past it
  (its first entry is newer than the offset) ticks may be missing, so the
  subscription is refused with error ``since_expired``: resubscribe with an ISO-8601 ``since``
  (e.g. the ``exchange_ts`` of the last tick held). There is no honest way to turn a trimmed
  arrival-time offset into an exchange-time position.
* an ISO-8601 time with an offset, T0 (inclusive, on ``exchange_ts``): ring ids are arrival
  times (ms), and a tick arrives at or after its exchange time unless the exchange clock is
  ahead of ours, by at most ``max_future_skew_s`` (larger is rejected at ingest). So the first
  entry with ``exchange_ts >= T0`` is found by scanning forward from id ``T0 - skew`` (bounded
  by the ring's length); everything after it in ring order follows.
  When the ring's first entry F is newer than T0, the database is read first through the
  ReplayEngine from T0 up to F's (exchange_ts, sequence_id), exclusive, then the ring from F
  inclusive. Ring entries after F that the database part already sent (late RECOVERED ticks
  with exchange_ts >= T0 and a position at or before the last database tick) are skipped. If F
  was trimmed while the database was read, the database is read again from the last tick sent
  up to the ring's new first entry.

Database ticks have no ring offset (``"offset": null``). Positions compare on microseconds, the
resolution PostgreSQL keeps.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import cast

import asyncpg
import msgspec
import redis.asyncio as aioredis

from api.ws import protocol
from api.ws.connection import Subscription
from api.ws.hub import Entries, parse_offset
from nadi.redis_keys import RedisKeys
from nadi.replay import ReplayEngine, to_datetime_us, to_epoch_us

PAGE = 1000  # ring entries per XRANGE
_OFFSET_RE = re.compile(r"^\d{1,20}-\d{1,20}$")

Key = tuple[int, int]  # (exchange_ts µs, sequence_id): an instrument's position in time order


class _Head(msgspec.Struct):
    """The fields of a ring entry's LiveTick that catch-up needs (the rest is passed through)."""

    sequence_id: int
    exchange_ts: int  # UTC epoch ns


_head = msgspec.json.Decoder(_Head).decode


class SinceExpired(Exception):
    """The ring no longer holds everything after the client's offset."""


class Trimmed(Exception):
    """The ring's first entry F vanished (trimmed) between reading it and reading from it."""


def parse_since(since: str) -> str | datetime:
    """A ring offset (returned as is) or an aware datetime; ValueError otherwise."""
    if _OFFSET_RE.match(since):
        return since
    dt = datetime.fromisoformat(since)
    if dt.tzinfo is None:
        raise ValueError("since: an ISO-8601 time needs a UTC offset (e.g. +05:30 or Z)")
    return dt


class CatchUp:
    """Runs catch-ups for one API process (stateless apart from its clients)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        pool: asyncpg.Pool | None,
        *,
        chunk_rows: int,
        max_future_skew_s: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._pool = pool
        self._chunk_rows = chunk_rows
        self._skew_ms = int(max_future_skew_s * 1000)

    async def run(self, sub: Subscription, since: str | datetime | None) -> None:
        """Catch ``sub`` up from ``since`` and switch it to live. Raises SinceExpired."""
        ring = self._keys.ring(sub.token)
        if since is None:
            last = cast(Entries, await self._redis.xrevrange(ring, "+", "-", count=1))
            last_id = last[0][0].decode() if last else None
            await self._go_live(sub, last_id)
        elif isinstance(since, str):
            await self._check_offset(ring, since)
            await self._go_live(sub, since)
        else:
            await self._from_time(sub, ring, since)

    # ---- the switch ------------------------------------------------------------------------

    async def _go_live(self, sub: Subscription, last_id: str | None) -> None:
        """Send ring entries after ``last_id`` (exclusive; all when None), then switch."""
        ring = self._keys.ring(sub.token)
        while True:
            start = "-" if last_id is None else "(" + last_id
            async for entry_id, payload in self._ring(ring, start):
                await sub.conn.put(protocol.tick_from_payload(entry_id, payload))
                last_id = entry_id.decode()
            if sub.overflow:  # live ticks were discarded from the buffer: the ring has them
                sub.overflow = False
                continue
            # No await from here on: the hub cannot dispatch in between.
            last = parse_offset(last_id) if last_id is not None else (-1, -1)
            for offset, message in sub.buffer:
                if offset > last:
                    sub.conn.push(message)
                    last = offset
            if sub.buffer:
                last_id = f"{last[0]}-{last[1]}" if last[0] >= 0 else last_id
            sub.buffer = []
            sub.live = True
            sub.conn.push(protocol.synced(sub.token, last_id))
            return

    # ---- ring reads ------------------------------------------------------------------------

    async def _ring(self, ring: str, start: str) -> AsyncIterator[tuple[bytes, bytes]]:
        """(entry id, LiveTick JSON) from ``start`` to the current end, a page at a time."""
        lo = start
        while True:
            page = cast(Entries, await self._redis.xrange(ring, lo, "+", count=PAGE))
            for entry_id, fields in page:
                yield entry_id, fields[b"d"]
            if len(page) < PAGE:
                return
            lo = "(" + page[-1][0].decode()

    async def _check_offset(self, ring: str, offset: str) -> None:
        # Trimming removes from the head and (Redis 7.0) does not record what it removed, so
        # the only safe test is: the client's own entry must still be in the ring (or the
        # ring must start after nothing, i.e. be empty).
        first = await self._first(ring)
        if first is not None and parse_offset(first[0]) > parse_offset(offset):
            raise SinceExpired(f"ring offset {offset} is no longer in the ring")

    async def _first(self, ring: str) -> tuple[str, Key] | None:
        head = cast(Entries, await self._redis.xrange(ring, "-", "+", count=1))
        if not head:
            return None
        entry_id, fields = head[0]
        h = _head(fields[b"d"])
        return entry_id.decode(), (h.exchange_ts // 1000, h.sequence_id)

    # ---- since = time ----------------------------------------------------------------------

    async def _from_time(self, sub: Subscription, ring: str, t0: datetime) -> None:
        t0_us = to_epoch_us(t0)
        first = await self._first(ring)
        if first is not None and first[1][0] <= t0_us:
            start_id, last_seen = await self._find_start(ring, t0_us)
            await self._go_live(sub, last_seen if start_id is None else _before(start_id))
            return
        # The ring starts after T0 (or is empty): the database first.
        after: Key | None = None
        while True:
            after = await self._from_db(sub, t0, after, first[1] if first else None)
            if first is None:
                break
            try:
                await self._ring_from(sub, ring, first[0], t0_us, after)
                return
            except Trimmed:
                first = await self._first(ring)
        # Empty ring at the start: the whole ring now (skipping what the database sent).
        await self._ring_from(sub, ring, None, t0_us, after)

    async def _find_start(self, ring: str, t0_us: int) -> tuple[str | None, str | None]:
        """(id of the first ring entry with exchange_ts >= T0 or None if there is none yet,
        the last id scanned)."""
        lo = f"{max(0, t0_us // 1000 - self._skew_ms)}-0"
        last: str | None = None
        async for entry_id, payload in self._ring(ring, lo):
            last = entry_id.decode()
            if _head(payload).exchange_ts // 1000 >= t0_us:
                return last, last
        if last is None:  # nothing at or after T0 - skew yet: whatever comes next is wanted
            last = _before(lo)
        return None, last

    async def _ring_from(
        self, sub: Subscription, ring: str, first_id: str | None, t0_us: int, after: Key | None
    ) -> None:
        """Ring from ``first_id`` inclusive (all when None), skipping what the database part
        sent, then switch to live. Raises Trimmed when ``first_id`` is gone."""
        last_id: str | None = None
        start = "-" if first_id is None else first_id
        async for entry_id, payload in self._ring(ring, start):
            if last_id is None and first_id is not None and entry_id.decode() != first_id:
                raise Trimmed
            last_id = entry_id.decode()
            h = _head(payload)
            ts_us = h.exchange_ts // 1000
            if after is not None and ts_us >= t0_us and (ts_us, h.sequence_id) <= after:
                continue
            await sub.conn.put(protocol.tick_from_payload(entry_id, payload))
        if last_id is None and first_id is not None:
            raise Trimmed
        await self._go_live(sub, last_id)

    async def _from_db(
        self, sub: Subscription, t0: datetime, after: Key | None, stop: Key | None
    ) -> Key | None:
        """Database ticks from T0 (after ``after``) up to ``stop`` (exclusive; when None, up to
        now plus the allowed clock skew). Returns the position of the last one sent."""
        if self._pool is None:
            return after
        end_us = stop[0] + 1 if stop else (time.time_ns() // 1000 + self._skew_ms * 1000)
        engine = ReplayEngine(self._pool, chunk_rows=self._chunk_rows)
        resume = None if after is None else (after[0] * 1000, sub.token, after[1])
        async for batch in engine.batches(
            [sub.token], t0, to_datetime_us(end_us), speed=0.0, after=resume
        ):
            for t in batch:
                key = (t.exchange_ts // 1000, t.sequence_id)
                if stop is not None and key >= stop:
                    return after
                await sub.conn.put(protocol.tick_from_live(None, t))
                after = key
        return after


def _before(entry_id: str) -> str | None:
    """The greatest stream id below ``entry_id`` (so an exclusive range starts at it)."""
    ms, seq = parse_offset(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{2**64 - 1}"
    return None
