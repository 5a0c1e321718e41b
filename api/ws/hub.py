"""The per-process live fan-out: one reader of ``nadi:live`` for every connection of this API
process (DESIGN.md section 7).

The reader XREADs the live stream (BLOCK) from where it was when the hub started, decodes each
batch once (``nadi.ring.decode_live_entry``), builds each subscribed tick's message bytes once
and hands the same bytes to every subscription of that instrument (``Subscription.deliver``,
which never blocks). So the cost of a batch is one decode plus one small append per interested
connection, and a slow client only ever hurts its own queue.

Ownership: :meth:`Hub.start` creates the reader and the stall watchdog tasks; :meth:`Hub.stop`
cancels and awaits them and asks every connection to close (1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.ws import protocol
from api.ws.connection import CLOSE_STALLED, Connection, Subscription
from nadi.logs import get_logger
from nadi.redis_keys import RedisKeys
from nadi.ring import decode_live_entry

log = get_logger(__name__)

BLOCK_MS = 1000  # XREAD BLOCK: how long one read waits for a batch before looping
READ_COUNT = 200  # live entries (processor batches) per XREAD

Entries = list[tuple[bytes, dict[bytes, bytes]]]  # a stream range as redis-py returns it


def parse_offset(offset: str | bytes) -> tuple[int, int]:
    """A stream id ``"<ms>-<seq>"`` as a comparable pair (string order is wrong: "9" > "10")."""
    if isinstance(offset, bytes):
        offset = offset.decode()
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


class Hub:
    """Live fan-out and connection registry of one API process."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        *,
        stall_timeout_s: float,
        max_connections_per_key: int,
        queue_size: int = 1000,
    ) -> None:
        self._redis = redis
        self._live = keys.live
        # Dispatch yields to the writers after this many ticks, so a burst bigger than a
        # connection's queue (a large processor batch, say) reaches a client that keeps up
        # instead of being evicted from its queue before its writer could run.
        self._yield_every = max(1, queue_size // 4)
        self._stall_timeout_s = stall_timeout_s
        self._max_per_key = max_connections_per_key
        self._index: dict[int, set[Subscription]] = {}
        self.connections: set[Connection] = set()
        self._per_key: Counter[str | None] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_id = "0-0"
        self.batches = 0  # live batches read (for tests and metrics)
        self.ready = asyncio.Event()  # the reader has resolved its start position

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # "$" resolved once, here, rather than passed to every XREAD: an entry added between
        # two reads is then never skipped, and a connection accepted after start() sees every
        # batch from then on.
        with contextlib.suppress(RedisError):
            last = cast(Entries, await self._redis.xrevrange(self._live, "+", "-", count=1))
            if last:
                self._last_id = last[0][0].decode()
        self.ready.set()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="ws-hub-reader"),
            asyncio.create_task(self._watchdog(), name="ws-hub-watchdog"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for c in list(self.connections):
            c.close(1001, "server shutting down")

    # ---- registry --------------------------------------------------------------------------

    def add_connection(self, conn: Connection) -> bool:
        """Register ``conn``; False when its key already has the maximum number open."""
        if self._per_key[conn.key] >= self._max_per_key:
            return False
        self._per_key[conn.key] += 1
        self.connections.add(conn)
        return True

    def remove_connection(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self._per_key[conn.key] -= 1
        if self._per_key[conn.key] <= 0:
            del self._per_key[conn.key]
        for sub in list(conn.subs.values()):
            self.unsubscribe(sub)

    def subscribe(self, sub: Subscription) -> None:
        self._index.setdefault(sub.token, set()).add(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._index.get(sub.token)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._index[sub.token]

    # ---- background tasks ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                resp = cast(
                    list[tuple[bytes, Entries]] | None,
                    await self._redis.xread(
                        {self._live: self._last_id}, count=READ_COUNT, block=BLOCK_MS
                    ),
                )
                backoff = 0.1
            except (RedisError, OSError) as e:
                # Redis restarting: keep the position and retry; clients just see a pause.
                log.warning("live stream read failed", error=str(e), retry_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode()
                    await self._dispatch(fields)

    async def _dispatch(self, fields: dict[bytes, bytes]) -> None:
        self.batches += 1
        if not self._index:  # nobody subscribed: skip the decode
            return
        try:
            batch = decode_live_entry(fields)
        except (msgspec.DecodeError, KeyError, ValueError) as exc:
            log.error("undecodable live batch skipped", error=str(exc))
            return
        index = self._index
        since_yield = 0
        for e in batch:
            subs = index.get(e.t.instrument_token)
            if not subs:
                continue
            message = protocol.tick_from_live(e.o, e.t)
            offset = parse_offset(e.o)
            for sub in subs:
                sub.deliver(offset, message)
            since_yield += 1
            if since_yield >= self._yield_every:
                since_yield = 0
                await asyncio.sleep(0)  # (between ticks: ``subs`` is not being iterated)

    async def _watchdog(self) -> None:
        period = min(1.0, self._stall_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for c in list(self.connections):
                if c.stalled_for(now) > self._stall_timeout_s:
                    log.info("closing stalled websocket client", dropped=c.dropped_total)
                    c.close(CLOSE_STALLED, "stalled")
