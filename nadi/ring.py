"""The Redis ring buffer: one stream per instrument (MAXLEN-bounded) plus the live fan-out.

Appends are idempotent: a per-day bitmap of sequence ids already appended is tested and set in
the same Lua call as the XADD, so a redelivered batch never puts a tick in the ring twice. The
ring stream's entry id is the tick's *ring offset*, which WebSocket clients resume from.

The live fan-out stream ``nadi:live`` gets one entry per batch: field ``b`` holds a JSON array
of ``{"o": ring offset, "t": tick}`` in ring order, so readers decode once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from nadi.redis_keys import BITMAP_MAX_SEQ, LIVE_STREAM
from nadi.tick import Tick

# Keys are built inside the script (single-node Redis; the key set depends on the batch).
_APPEND = """
local items = cmsgpack.unpack(ARGV[1])
local maxlen, live_maxlen, ttl, maxbit = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local out, seen, live = {}, {}, {}
for i, it in ipairs(items) do
  local day, token, seq, payload = it[1], it[2], it[3], it[4]
  local sk = 'nadi:rs:' .. day .. ':' .. token
  local fresh
  if seq < maxbit then
    fresh = redis.call('SETBIT', sk, seq, 1) == 0
  else
    sk = sk .. ':big'
    fresh = redis.call('SADD', sk, seq) == 1
  end
  seen[sk] = true
  if fresh then
    local id = redis.call('XADD', 'nadi:ring:' .. token, 'MAXLEN', '~', maxlen, '*', 'd', payload)
    live[#live + 1] = '{"o":"' .. id .. '","t":' .. payload .. '}'
    out[i] = id
  else
    out[i] = ''
  end
end
for k, _ in pairs(seen) do redis.call('EXPIRE', k, ttl) end
if #live > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', live_maxlen, '*', 'b', '[' .. table.concat(live, ',') .. ']')
end
return out
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
    """One element of a live fan-out batch."""

    o: str  # ring offset (the instrument stream's entry id)
    t: LiveTick


_encode_json = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode
live_batch_decoder = msgspec.json.Decoder(list[LiveEntry])


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
        self._tail = [maxlen, live_maxlen, ttl_s, BITMAP_MAX_SEQ]

    async def append(
        self, ticks: Sequence[Tick], days: Sequence[int], statuses: Sequence[str]
    ) -> list[str | None]:
        """Returns the ring offset of each tick, or None where it was already in the ring."""
        if not ticks:
            return []
        blob = _pack(
            [
                # As str: Redis's Lua msgpack predates the bin type.
                (d, t.instrument_token, t.sequence_id, live_payload(t, s).decode())
                for t, d, s in zip(ticks, days, statuses, strict=True)
            ]
        )
        result = await self._script(keys=[LIVE_STREAM], args=[blob, *self._tail])
        return [r.decode() if r else None for r in result]
