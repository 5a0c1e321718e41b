"""The per-process live fan-out: one reader of the live stream (``RedisKeys.live``) for every
connection of this API process (DESIGN.md section 7).

The reader XREADs the live stream (BLOCK) from where it was when the hub started, decodes each
batch once (as ``nadi.ring.decode_live_entry``), builds each subscribed tick's message bytes once,
groups one read's ticks per instrument into :class:`~api.ws.connection.Chunk` s (bytes joined
once) and hands the same chunk to every subscription of that instrument
(``Subscription.deliver``, which never blocks). So the cost of a read is one decode plus one
small append per interested connection and instrument, whatever the tick rate, and a slow client
only ever hurts its own queue. With a wide fan-out (a round queued ``COALESCE_PUSHES`` chunks or
more) reads are at least ``ws_flush_interval_ms`` apart, so each connection's frames carry more
ticks: one send syscall per connection and round is the largest cost (PROFILE, issue 12).

Every API process (``nadi api --workers N``) runs its own hub on the same stream: each reads
every entry, so each of its connections gets every tick once, as with one process; the
per-key connection limit is counted over all of them in Redis (:class:`SharedCounts`).

Ownership: :meth:`Hub.start` creates the reader and the stall watchdog tasks; :meth:`Hub.stop`
cancels and awaits them and asks every connection to close (1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import Counter
from typing import cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.ws import protocol
from api.ws.connection import CLOSE_STALLED, Chunk, Connection, Offset, Subscription
from api.ws.metrics import WS_CONNECTIONS, WS_STALLED
from nadi.logs import get_logger
from nadi.redis_keys import RedisKeys
from nadi.tick import LiveTick

log = get_logger(__name__)

BLOCK_MS = 1000  # XREAD BLOCK: how long one read waits for a batch before looping
READ_COUNT = 200  # live entries (processor batches) per XREAD
# A round that queued at least this many chunks (connections x instruments) is a wide fan-out:
# the next read waits until ``ws_flush_interval_ms`` after this one (see ``_read_loop``).
COALESCE_PUSHES = 256

_live_payloads = msgspec.json.Decoder(list[LiveTick])
_encode = msgspec.json.Encoder().encode

Entries = list[tuple[bytes, dict[bytes, bytes]]]  # a stream range as redis-py returns it


def key_label(key: str | None) -> str:
    """The per-key limit's label of an API key: a digest, so Redis never holds a key."""
    return "-" if key is None else hashlib.sha256(key.encode()).hexdigest()[:16]


class SharedCounts:
    """Open /ws connections per API key over every API process on this Redis (``nadi api
    --workers N``): a hash of ``<process>|<label>`` -> count, and a hash of process -> expiry
    that each live process renews (the hub's watchdog, every second or faster). Admission is one
    Lua call: it drops the counts of processes whose expiry passed (one killed by SIGKILL
    holds nothing for longer than :data:`PROCESS_TTL_MS`), sums the label's counts and
    increments this process's only if the sum is below the limit."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self.process = uuid.uuid4().hex[:12]
        self._counts = f"{keys.live}:ws:conns"
        self._procs = f"{keys.live}:ws:procs"
        self._admit = redis.register_script(_ADMIT_LUA)
        self._redis = redis

    async def admit(self, label: str, limit: int) -> bool:
        args: list[str | int] = [self.process, label, limit, PROCESS_TTL_MS]
        return bool(await self._admit(keys=[self._counts, self._procs], args=args))

    async def release(self, label: str) -> None:
        field = f"{self.process}|{label}"
        if int(await self._redis.hincrby(self._counts, field, -1)) <= 0:
            await self._redis.hdel(self._counts, field)

    async def heartbeat(self) -> None:
        now_s, now_us = await self._redis.time()
        await self._redis.hset(
            self._procs, self.process, str(now_s * 1000 + now_us // 1000 + PROCESS_TTL_MS)
        )

    async def forget(self) -> None:
        fields = cast(list[bytes], await self._redis.hkeys(self._counts))
        mine = [f for f in fields if f.startswith(self.process.encode() + b"|")]
        if mine:
            await self._redis.hdel(self._counts, *mine)
        await self._redis.hdel(self._procs, self.process)


PROCESS_TTL_MS = 10_000  # a process that has not renewed its expiry this long holds nothing
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], now + tonumber(ARGV[4]))
local procs = redis.call('HGETALL', KEYS[2])
local alive = {}
for i = 1, #procs, 2 do
  if tonumber(procs[i + 1]) < now then
    redis.call('HDEL', KEYS[2], procs[i])
  else
    alive[procs[i]] = true
  end
end
local total = 0
local counts = redis.call('HGETALL', KEYS[1])
for i = 1, #counts, 2 do
  local f = counts[i]
  local sep = string.find(f, '|', 1, true)
  if not alive[string.sub(f, 1, sep - 1)] then
    redis.call('HDEL', KEYS[1], f)
  elseif string.sub(f, sep + 1) == ARGV[2] then
    total = total + tonumber(counts[i + 1])
  end
end
if total >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 1)
return 1
"""


def parse_offset(offset: str | bytes) -> tuple[int, int]:
    """A stream id ``"<ms>-<seq>"`` as a comparable pair (string order is wrong: "9" > "10")."""
    if isinstance(offset, bytes):  # int() reads ASCII digits in bytes too
        bms, _, bseq = offset.partition(b"-")
        return int(bms), int(bseq or 0)
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
        max_frame_bytes: int = 262_144,
        flush_interval_ms: float = 0.0,
    ) -> None:
        self._redis = redis
        self._live = keys.live
        # Dispatch yields to the writers after this many ticks, so a burst bigger than a
        # connection's queue (a large processor batch, say) reaches a client that keeps up
        # instead of being evicted from its queue before its writer could run.
        self._yield_every = max(1, queue_size // 4)
        self._chunk_bytes = max(1024, max_frame_bytes // 2)
        self._flush_interval_s = flush_interval_ms / 1000
        self._stall_timeout_s = stall_timeout_s
        self._max_per_key = max_connections_per_key
        self._index: dict[int, set[Subscription]] = {}
        self.connections: set[Connection] = set()
        self._per_key: Counter[str] = Counter()
        self._shared = SharedCounts(redis, keys)
        self._counted: set[Connection] = set()  # connections counted in Redis
        self._releases: set[asyncio.Task[None]] = set()
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
        await asyncio.gather(*self._releases, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._shared.forget()  # this process's counts go with it

    # ---- registry --------------------------------------------------------------------------

    async def add_connection(self, conn: Connection) -> bool:
        """Register ``conn``; False when its key already has the maximum number open, counted
        over every API process on this Redis (:class:`SharedCounts`), or over this process
        alone while Redis does not answer."""
        label = key_label(conn.key)
        try:
            admitted = await self._shared.admit(label, self._max_per_key)
            self._counted.add(conn)
        except (RedisError, OSError) as e:
            log.warning("per-key connection count not shared (Redis)", error=str(e))
            admitted = self._per_key[label] < self._max_per_key
        if not admitted:
            self._counted.discard(conn)
            return False
        self._per_key[label] += 1
        self.connections.add(conn)
        WS_CONNECTIONS.set(len(self.connections))
        return True

    def remove_connection(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        WS_CONNECTIONS.set(len(self.connections))
        label = key_label(conn.key)
        self._per_key[label] -= 1
        if self._per_key[label] <= 0:
            del self._per_key[label]
        if conn in self._counted:
            self._counted.discard(conn)
            task = asyncio.create_task(self._shared.release(label), name="ws-hub-release")
            self._releases.add(task)
            task.add_done_callback(self._released)
        for sub in list(conn.subs.values()):
            self.unsubscribe(sub)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("per-key connection count not released", error=str(task.exception()))

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
        loop = asyncio.get_running_loop()
        last_read = 0.0
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
            entries = [e for _stream, es in resp or () for e in es]
            if not entries:
                continue
            self._last_id = entries[-1][0].decode()
            pushes = await self._dispatch([fields for _id, fields in entries])
            if pushes >= COALESCE_PUSHES and self._flush_interval_s:
                # A wide fan-out: every round costs one frame (one send syscall) per
                # connection, so let the next round gather more ticks per frame.
                wait = last_read + self._flush_interval_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            last_read = loop.time()

    def _groups(
        self, batches: list[dict[bytes, bytes]]
    ) -> dict[int, tuple[list[Offset], list[bytes]]]:
        """The subscribed ticks of one read, per instrument in ring order, as messages built
        once (``tick`` messages shared by every subscriber)."""
        index = self._index
        groups: dict[int, tuple[list[Offset], list[bytes]]] = {}
        for fields in batches:
            self.batches += 1
            try:  # as nadi.ring.decode_live_entry, without an object per tick
                ticks = _live_payloads.decode(fields[b"p"])
                offsets = fields[b"o"].split(b",")
                if len(offsets) != len(ticks):
                    raise ValueError("offsets and ticks differ in number")
            except (msgspec.DecodeError, KeyError, ValueError) as exc:
                log.error("undecodable live batch skipped", error=str(exc))
                continue
            for o, t in zip(offsets, ticks, strict=True):
                token = t.instrument_token
                if not o or token not in index:  # (no offset: a redelivery already in the ring)
                    continue
                g = groups.get(token)
                if g is None:
                    g = groups[token] = ([], [])
                g[0].append(parse_offset(o))
                g[1].append(protocol.tick_from_payload(o, _encode(t)))
        return groups

    async def _dispatch(self, batches: list[dict[bytes, bytes]]) -> int:
        """Fan one read out; returns how many chunks were queued (connections x instruments)."""
        if not self._index:  # nobody subscribed: skip the decode
            self.batches += len(batches)
            return 0
        pushes = 0
        since_yield = 0
        step = self._yield_every
        for token, (offsets, msgs) in self._groups(batches).items():
            # Chunks of at most ``step`` ticks and about a frame's bytes: a burst bigger than a
            # queue reaches a client that keeps up, since the writers run between chunks.
            i = 0
            while i < len(msgs):
                j = min(len(msgs), i + step)
                size = 0
                for k in range(i, j):
                    size += len(msgs[k]) + 1
                    if size > self._chunk_bytes and k > i:
                        j = k
                        break
                subs = self._index.get(token)
                if subs:
                    chunk = Chunk(token, offsets[i:j], msgs[i:j])
                    for sub in subs:
                        sub.deliver(chunk)
                    pushes += len(subs)
                since_yield += j - i
                i = j
                if since_yield >= step:
                    since_yield = 0
                    await asyncio.sleep(0)  # (between chunks: ``subs`` is not being iterated)
        return pushes

    async def _watchdog(self) -> None:
        period = min(1.0, self._stall_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._shared.heartbeat()
            except (RedisError, OSError) as e:
                log.warning("per-key connection count heartbeat failed", error=str(e))
            now = time.monotonic()
            for c in list(self.connections):
                if c.stalled_for(now) > self._stall_timeout_s:
                    log.info("closing stalled websocket client", dropped=c.dropped_total)
                    c.close(CLOSE_STALLED, "stalled")
                    WS_STALLED.inc()
