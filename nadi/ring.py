"""The Redis ring buffer: one stream per instrument (MAXLEN-bounded) plus the live fan-out.

Appends are idempotent, checked in the same Lua call as the XADD: in-order ticks (OK, STALE)
arrive in increasing sequence, so the last appended sequence per instrument-day
(``nadi:rl:{day}``) identifies a redelivery; late ticks are remembered in a small set. A
redelivered batch never puts a tick in the ring twice. After Redis loses its keys the ring
restarts at a *floor* (``nadi:rfloor:{day}``, the first in-order tick appended since): a late
tick that the database already had goes in only above it, so the ring stays a gap-free tail
of what is stored. The
ring stream's entry id is the tick's *ring offset*, which WebSocket clients resume from.

The live fan-out stream ``nadi:live`` gets one entry per batch: field ``p`` holds a JSON array
of the batch's ticks (LiveTick) and field ``o`` their ring offsets, comma-separated and aligned
(empty for a redelivered tick already in the ring); ``decode_live_entry`` turns an entry into
``LiveEntry(o, t)`` items in ring order, so readers decode once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import redis.asyncio as aioredis

from nadi.redis_keys import LIVE_STREAM
from nadi.tick import Tick

# How the script decides whether a tick is new to the ring (``RingMode``).
IN_ORDER = 1  # OK/STALE: increasing per instrument-day, so compared with the last appended
NEW_LATE = 0  # out of order and new to the database: appended unless already in the ring
STORED_LATE = 2  # out of order, already stored: only if above the floor and not in the ring

# Keys are built inside the script (single-node Redis; the key set depends on the batch).
_APPEND = """
local items = cmsgpack.unpack(ARGV[1])
local blob = ARGV[5]
local maxlen, live_maxlen, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local call, sub = redis.call, string.sub
-- Per (day, token) and per token state, keyed by numbers: no string building per tick.
local out, ringlast, groups, floors, ringkeys = {}, {}, {}, {}, {}
local appended = 0
for i, it in ipairs(items) do
  local day, token, seq, mode = it[1], it[2], it[3], it[4]
  local fresh
  if mode == 1 then
    -- In-order ticks of an instrument-day reach the ring in increasing sequence: anything at
    -- or below the last appended one is a redelivery.
    local gk = day * 4294967296 + token
    local rl = ringlast[gk]
    if rl == nil then
      rl = tonumber(call('HGET', 'nadi:rl:' .. day, token) or '-1')
      ringlast[gk] = rl
      groups[gk] = {day, token}
      -- No record (a new day, or Redis lost its keys): the ring restarts here, and older
      -- ticks that are already stored must not land in it behind this one.
      if rl < 0 then floors[gk] = {day, token, seq} end
    end
    fresh = seq > rl
    if fresh then ringlast[gk] = seq end
  else
    -- Late ticks (few): remembered one by one.
    local lk = 'nadi:rlate:' .. day .. ':' .. token
    if mode == 2 then
      local floor = tonumber(call('HGET', 'nadi:rfloor:' .. day, token) or '-1')
      fresh = floor >= 0 and seq > floor and call('SADD', lk, seq) == 1
    else
      fresh = call('SADD', lk, seq) == 1
    end
    call('EXPIRE', lk, ttl)
  end
  if fresh then
    local rk = ringkeys[token]
    if rk == nil then
      rk = 'nadi:ring:' .. token
      ringkeys[token] = rk
    end
    -- The tick's JSON is a slice of the live payload (ARGV[5]): sent once, not twice.
    out[i] = call('XADD', rk, 'MAXLEN', '~', maxlen, '*', 'd', sub(blob, it[5], it[5] + it[6] - 1))
    appended = appended + 1
  else
    out[i] = ''
  end
end
for gk, dt in pairs(groups) do
  call('HSET', 'nadi:rl:' .. dt[1], dt[2], ringlast[gk])
  call('EXPIRE', 'nadi:rl:' .. dt[1], ttl)
end
for _, f in pairs(floors) do
  call('HSET', 'nadi:rfloor:' .. f[1], f[2], f[3])
  call('EXPIRE', 'nadi:rfloor:' .. f[1], ttl)
end
-- Building the live JSON in Lua cost more than all the XADDs: the client sends the batch's
-- payloads pre-joined (ARGV[5]) and only the offsets are joined here (and returned so,
-- one string rather than an array of thousands).
local offsets = table.concat(out, ',')
if appended > 0 then
  call('XADD', KEYS[1], 'MAXLEN', '~', live_maxlen, '*', 'p', blob, 'o', offsets)
end
return offsets
"""


class LiveTick(msgspec.Struct, omit_defaults=True):
    """What the ring and the live stream carry for one tick (wire fields plus status)."""

    instrument_token: int
    sequence_id: int
    exchange_ts: int  # UTC epoch nanoseconds
    last_price: float
    status: str
    exchange: str | None = None
    last_qty: int | None = None
    volume: int | None = None
    oi: int | None = None
    bid: float | None = None
    ask: float | None = None
    bid_qty: int | None = None
    ask_qty: int | None = None
    feed: str | None = None


class LiveEntry(msgspec.Struct):
    """One tick of a live fan-out batch."""

    o: str  # ring offset (the instrument stream's entry id)
    t: LiveTick


_encode_json = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode
_live_payloads = msgspec.json.Decoder(list[LiveTick])


def decode_live_entry(fields: Mapping[bytes, bytes]) -> list[LiveEntry]:
    """The ticks of one ``nadi:live`` entry, in ring order. Fields: ``p`` a JSON array of
    LiveTick, ``o`` the comma-separated ring offsets aligned with it, empty where the tick was
    a redelivery that is already in the ring (those are skipped here)."""
    ticks = _live_payloads.decode(fields[b"p"])
    offsets = fields[b"o"].decode().split(",")
    return [LiveEntry(o, t) for o, t in zip(offsets, ticks, strict=True) if o]


IN_ORDER_STATUSES = frozenset(("OK", "STALE"))  # past the last sequence: increasing
_STATUS_TAIL = {s: f',"status":"{s}"}}'.encode() for s in ("OK", "STALE", "RECOVERED", "LATE")}


def live_payload(t: Tick, status: str) -> bytes:
    """The LiveTick JSON of a tick: Tick encodes with LiveTick's field names (``exchange_ts``
    in epoch ns), and the status is spliced in; far cheaper than building a LiveTick."""
    return _encode_json(t)[:-1] + _STATUS_TAIL[status]


class RingWriter:
    """Appends ticks to their instrument rings and the live stream in one Lua call per batch."""

    def __init__(
        self, client: aioredis.Redis, *, maxlen: int, live_maxlen: int = 20_000, ttl_s: int
    ) -> None:
        self._client = client
        self._script = client.register_script(_APPEND)
        self._tail = [maxlen, live_maxlen, ttl_s]

    async def append(
        self,
        ticks: Sequence[Tick],
        days: Sequence[int],
        statuses: Sequence[str],
        modes: Sequence[int] | None = None,
    ) -> list[str | None]:
        """Returns the ring offset of each tick, or None where it was already in the ring.
        ``modes`` (IN_ORDER, NEW_LATE, STORED_LATE) default from the statuses: OK and STALE
        are in order, anything else is a late tick new to the database."""
        if not ticks:
            return []
        if modes is None:
            modes = [IN_ORDER if s in IN_ORDER_STATUSES else NEW_LATE for s in statuses]
        payloads = [live_payload(t, s) for t, s in zip(ticks, statuses, strict=True)]
        joined = b"[" + b",".join(payloads) + b"]"
        items = []
        at = 2  # Lua's 1-based position of the first payload, after "["
        for t, d, m, p in zip(ticks, days, modes, payloads, strict=True):
            items.append((d, t.instrument_token, t.sequence_id, m, at, len(p)))
            at += len(p) + 1
        blob = _pack(items)
        result = await self._script(keys=[LIVE_STREAM], args=[blob, *self._tail, joined])
        return [o or None for o in result.decode().split(",")]
