"""The Redis ring buffer: one stream per instrument (MAXLEN-bounded) plus the live fan-out.

Key names come from ``nadi.redis_keys.RedisKeys`` (namespaced by the database's identity).

Appends are idempotent, checked in the same Lua call as the XADD: a bitmap per
instrument-day of the sequence ids appended so far, so a redelivered or repeated tick never
goes in twice, whatever order it comes in. The ring of an instrument-day starts at a *floor*
(the first in-order tick appended, or the sequence after the database's last when the ring was
found behind the database and restarted): a tick the database already had (STORED_LATE) goes
in only at or above it and only if it is not in yet, so the ring stays a gap-free tail of
what is stored; a late tick new to the database (NEW_LATE) goes in whatever the floor.

An append may carry, per tick, the sequence the worker expects the ring to have reached (the
last sequence its batch was classified against; the ring is written first and in order, so its
top is never below that). A top below it means Redis lost data while the worker ran (restarted
from an older snapshot, flushed): the ring is restarted after the expected sequence in the same
call, as ``check`` does on first touch, and reported.

``check`` compares the ring's top (highest appended sequence) with the database's last
sequence of an instrument-day (ingest_state): behind, the ring is deleted and restarts after
the database's last (the catch-up reads the rest from the database); ahead (a database restored
from an older dump), it is kept, and the bitmap keeps redelivered ticks out.

The ring stream's entry id is the tick's *ring offset*, which WebSocket clients resume from.
The live fan-out stream gets one entry per append call: field ``p`` holds a JSON array of the
ticks (LiveTick) and field ``o`` their ring offsets, comma-separated and aligned (empty for a
tick already in the ring); ``decode_live_entry`` turns an entry into ``LiveEntry(o, t)`` items
in ring order, so readers decode once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis

from nadi.redis_keys import BITMAP_MAX_SEQ, RedisKeys
from nadi.tick import LiveTick, Tick

# How the script decides whether a tick may go into the ring (``modes``).
IN_ORDER = 1  # OK/STALE past the last sequence: anchors the ring (sets its floor if none)
NEW_LATE = 0  # out of order and new to the database: appended unless already in the ring
STORED_LATE = 2  # already stored: only at or above the floor and not in the ring

# Keys are built inside the script from the prefix (ARGV[6]); all share one hash slot.
_APPEND = """
local items = cmsgpack.unpack(ARGV[1])
local maxlen, live_maxlen, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local blob, pre, bigseq = ARGV[5], ARGV[6], tonumber(ARGV[7])
local call, sub = redis.call, string.sub
-- Per (day, token): {day, token, floor, top, bitmap key, dirty}; per token: the ring key.
local out, groups, ringkeys, restarted = {}, {}, {}, {}
local appended = 0
for i, it in ipairs(items) do
  local day, token, seq, mode, expect = it[1], it[2], it[3], it[4], it[7]
  local gk = day * 4294967296 + token
  local g = groups[gk]
  if g == nil then
    local f = call('HGET', pre .. 'rfloor:' .. day, token)
    local top = call('HGET', pre .. 'rl:' .. day, token)
    g = {day, token, tonumber(f or '-1'), tonumber(top or '-1'),
         pre .. 'ra:' .. day .. ':' .. token, false}
    groups[gk] = g
    if expect >= 0 and g[4] < expect then
      -- Behind what this worker already appended: Redis lost data. Restart after it.
      call('DEL', pre .. 'ring:' .. token, g[5], g[5] .. ':big')
      g[3], g[4], g[6] = expect + 1, expect, true
      restarted[#restarted + 1] = token
      restarted[#restarted + 1] = day
      restarted[#restarted + 1] = (top and 2 or 3)
    end
  end
  if g[3] < 0 and mode == 1 then
    -- No ring for this instrument-day (a new day, or Redis lost it): it starts here.
    g[3] = seq
    g[6] = true
  end
  local fresh = false
  if mode ~= 2 or (g[3] >= 0 and seq >= g[3]) then
    if seq < bigseq then
      fresh = call('SETBIT', g[5], seq, 1) == 0
    else
      fresh = call('SADD', g[5] .. ':big', seq) == 1
    end
  end
  if fresh then
    local rk = ringkeys[token]
    if rk == nil then
      rk = pre .. 'ring:' .. token
      ringkeys[token] = rk
    end
    -- The tick's JSON is a slice of the live payload (ARGV[5]): sent once, not twice.
    out[i] = call('XADD', rk, 'MAXLEN', '~', maxlen, '*', 'd', sub(blob, it[5], it[5] + it[6] - 1))
    appended = appended + 1
    if seq > g[4] then g[4] = seq end
    g[6] = true
  else
    out[i] = ''
  end
end
for _, g in pairs(groups) do
  if g[6] then
    local fk, tk = pre .. 'rfloor:' .. g[1], pre .. 'rl:' .. g[1]
    call('HSET', fk, g[2], g[3])
    call('HSET', tk, g[2], g[4])
    call('EXPIRE', fk, ttl)
    call('EXPIRE', tk, ttl)
    call('EXPIRE', g[5], ttl)
    if call('EXISTS', g[5] .. ':big') == 1 then call('EXPIRE', g[5] .. ':big', ttl) end
  end
end
for _, rk in pairs(ringkeys) do call('EXPIRE', rk, ttl) end
-- Building the live JSON in Lua cost more than all the XADDs: the client sends the batch's
-- payloads pre-joined (ARGV[5]) and only the offsets are joined here (and returned so,
-- one string rather than an array of thousands).
local offsets = table.concat(out, ',')
if appended > 0 then
  call('XADD', KEYS[1], 'MAXLEN', '~', live_maxlen, '*', 'p', blob, 'o', offsets)
  call('EXPIRE', KEYS[1], ttl)
end
return {offsets, restarted}
"""

# ARGV[1]: msgpack [[day, token, db_last (-1: none)], ...]. Returns a flat list of
# token, day, outcome (0 consistent, 1 ahead of the database, 2 behind: restarted,
# 3 no ring state although the database has ticks: restarted).
_CHECK = """
local items = cmsgpack.unpack(ARGV[1])
local pre, ttl = ARGV[2], tonumber(ARGV[3])
local call = redis.call
local out = {}
for _, it in ipairs(items) do
  local day, token, last = it[1], it[2], it[3]
  local top = call('HGET', pre .. 'rl:' .. day, token)
  local outcome = 0
  if top then top = tonumber(top) end
  if last >= 0 then
    if not top then outcome = 3 elseif top < last then outcome = 2 elseif top > last then outcome = 1 end
  elseif top then
    outcome = 1
  end
  if outcome >= 2 then
    local ak = pre .. 'ra:' .. day .. ':' .. token
    call('DEL', pre .. 'ring:' .. token, ak, ak .. ':big')
    call('HSET', pre .. 'rl:' .. day, token, last)
    call('HSET', pre .. 'rfloor:' .. day, token, last + 1)
    call('EXPIRE', pre .. 'rl:' .. day, ttl)
    call('EXPIRE', pre .. 'rfloor:' .. day, ttl)
  end
  if outcome > 0 then
    out[#out + 1] = token
    out[#out + 1] = day
    out[#out + 1] = outcome
  end
end
return out
"""

CONSISTENT, AHEAD, BEHIND, LOST = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class RingCheck:
    """An instrument-day whose ring did not match the database (``outcome``: AHEAD, BEHIND,
    LOST; the latter two were restarted)."""

    token: int
    day: int
    outcome: int


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
        self,
        client: aioredis.Redis,
        keys: RedisKeys,
        *,
        maxlen: int,
        live_maxlen: int = 20_000,
        ttl_s: int,
    ) -> None:
        self._client = client
        self.keys = keys
        self._script = client.register_script(_APPEND)
        self._check = client.register_script(_CHECK)
        self._tail = [maxlen, live_maxlen, ttl_s]
        self._ttl = ttl_s

    async def append(
        self,
        ticks: Sequence[Tick],
        days: Sequence[int],
        statuses: Sequence[str],
        modes: Sequence[int] | None = None,
    ) -> list[str | None]:
        """Returns the ring offset of each tick, or None where it was already in the ring (or
        is a stored tick below the floor). ``modes`` (IN_ORDER, NEW_LATE, STORED_LATE) default
        from the statuses: OK and STALE are in order, anything else is new to the database."""
        offsets, _ = await self.append_expecting(ticks, days, statuses, modes)
        return offsets

    async def append_expecting(
        self,
        ticks: Sequence[Tick],
        days: Sequence[int],
        statuses: Sequence[str],
        modes: Sequence[int] | None = None,
        expect: Sequence[int] | None = None,
    ) -> tuple[list[str | None], list[RingCheck]]:
        """As :meth:`append`; ``expect`` (aligned with ``ticks``, -1 for none) is the
        sequence each tick's ring must have reached already: a ring behind it is restarted
        after it first (BEHIND, or LOST when it had no state at all); those are returned."""
        if not ticks:
            return [], []
        if modes is None:
            modes = [IN_ORDER if s in IN_ORDER_STATUSES else NEW_LATE for s in statuses]
        if expect is None:
            expect = [-1] * len(ticks)
        payloads = [live_payload(t, s) for t, s in zip(ticks, statuses, strict=True)]
        joined = b"[" + b",".join(payloads) + b"]"
        items = []
        at = 2  # Lua's 1-based position of the first payload, after "["
        for t, d, m, e, p in zip(ticks, days, modes, expect, payloads, strict=True):
            items.append((d, t.instrument_token, t.sequence_id, m, at, len(p), e))
            at += len(p) + 1
        blob = _pack(items)
        result = await self._script(
            keys=[self.keys.live],
            args=[blob, *self._tail, joined, self.keys.prefix, BITMAP_MAX_SEQ],
        )
        offsets, flat = result
        restarted = [
            RingCheck(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
        return [o or None for o in offsets.decode().split(",")], restarted

    async def check(self, last: Mapping[tuple[int, int], int | None]) -> list[RingCheck]:
        """Compare each (token, day)'s ring with the database's last sequence (None: no tick
        stored); restart the rings that are behind. Returns the mismatches."""
        if not last:
            return []
        items = [(day, token, -1 if q is None else q) for (token, day), q in last.items()]
        flat = await self._check(
            keys=[self.keys.live], args=[_pack(items), self.keys.prefix, self._ttl]
        )
        return [
            RingCheck(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
