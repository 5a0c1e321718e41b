"""The Redis ring buffer: one stream per instrument (MAXLEN-bounded) plus the live fan-out.

Appends are idempotent: a per-day bitmap of sequence ids already appended is tested and set in
the same Lua call as the XADD, so a redelivered batch never puts a tick in the ring twice. The
stream entry id of the ring is the tick's *ring offset*, which WebSocket clients resume from.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from nadi.redis_keys import BITMAP_MAX_SEQ, LIVE_STREAM
from nadi.tick import Tick

# KEYS are built inside the script (single-node Redis; the key set depends on the batch).
_APPEND = """
local maxlen, live_maxlen, ttl, maxbit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out, seen = {}, {}
for i = 5, #ARGV, 4 do
  local day, token, seq, payload = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
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
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', live_maxlen, '*', 'k', token, 'o', id, 'd', payload)
    out[#out + 1] = id
  else
    out[#out + 1] = false
  end
end
for k, _ in pairs(seen) do redis.call('EXPIRE', k, ttl) end
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


_encoder = msgspec.json.Encoder()


def live_payload(t: Tick, status: str) -> bytes:
    return _encoder.encode(
        LiveTick(
            t.instrument_token, t.sequence_id, t.exchange_ts_ns, t.last_price, status,
            t.exchange, t.last_qty, t.volume, t.oi, t.bid, t.ask, t.bid_qty, t.ask_qty, t.feed,
        )  # fmt: skip
    )


class RingWriter:
    """Appends ticks to their instrument rings and the live stream in one Lua call per batch."""

    def __init__(
        self, client: aioredis.Redis, *, maxlen: int, live_maxlen: int = 200_000, ttl_s: int
    ) -> None:
        self._client = client
        self._script = client.register_script(_APPEND)
        self._head = [maxlen, live_maxlen, ttl_s, BITMAP_MAX_SEQ]

    async def append(self, ticks: Sequence[Tick], statuses: Sequence[str]) -> list[bytes | None]:
        """Returns the ring offset of each tick, or None where it was already in the ring."""
        if not ticks:
            return []
        args: list[object] = list(self._head)
        for t, status in zip(ticks, statuses, strict=True):
            args += (t.trading_day_ordinal, t.instrument_token, t.sequence_id, live_payload(t, status))
        result = await self._script(keys=[LIVE_STREAM], args=args)
        return [r if r else None for r in result]
