"""Per-batch Redis state of the processor: which sequences are already persisted (dedup) and
the SequenceTracker's last sequence per instrument and day.

Both are read before a batch is written and updated only after it is durable, so a key can
never claim a tick that was not persisted. Redis may lose them at any time; the database's
unique key and the fallback to ``max(sequence_id)`` keep the result exact. Each call is one
Lua script with the whole batch packed as a single msgpack argument (per-tick arguments made
client-side command packing the processor's biggest cost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import redis.asyncio as aioredis

from nadi.redis_keys import BITMAP_MAX_SEQ

Key = tuple[int, int]  # (instrument_token, trading day ordinal)

_LOAD = """
local groups = cmsgpack.unpack(ARGV[1])
local maxbit = tonumber(ARGV[2])
local out = {}
for gi, g in ipairs(groups) do
  local day, token, seqs = g[1], g[2], g[3]
  local dk = 'nadi:dd:' .. day .. ':' .. token
  local flags = {}
  for i, s in ipairs(seqs) do
    local hit
    if s < maxbit then hit = redis.call('GETBIT', dk, s) == 1
    else hit = redis.call('SISMEMBER', dk .. ':big', s) == 1 end
    flags[i] = hit and '1' or '0'
  end
  out[#out + 1] = table.concat(flags)
  out[#out + 1] = redis.call('HGET', 'nadi:seq:' .. day, token) or ''
end
return out
"""

_COMMIT = """
local groups = cmsgpack.unpack(ARGV[1])
local ttl, maxbit = tonumber(ARGV[2]), tonumber(ARGV[3])
for _, g in ipairs(groups) do
  local day, token, last, seqs = g[1], g[2], g[3], g[4]
  local dk = 'nadi:dd:' .. day .. ':' .. token
  local big = false
  for _, s in ipairs(seqs) do
    if s < maxbit then redis.call('SETBIT', dk, s, 1)
    else redis.call('SADD', dk .. ':big', s); big = true end
  end
  if #seqs > 0 then redis.call('EXPIRE', dk, ttl) end
  if big then redis.call('EXPIRE', dk .. ':big', ttl) end
  if last >= 0 then
    local sk = 'nadi:seq:' .. day
    local cur = redis.call('HGET', sk, token)
    if (not cur) or tonumber(cur) < last then redis.call('HSET', sk, token, last) end
    redis.call('EXPIRE', sk, ttl)
  end
end
return 1
"""

_pack = msgspec.msgpack.Encoder().encode


class TickState:
    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl = ttl_s
        self._load = client.register_script(_LOAD)
        self._commit = client.register_script(_COMMIT)

    async def load(
        self, keys: Sequence[Key], seqs: Sequence[int]
    ) -> tuple[list[bool], dict[Key, int | None]]:
        """For each tick (given by its key and sequence): already persisted? And the last
        sequence per (token, day), None where Redis has no state."""
        groups: dict[Key, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        order = list(groups)
        blob = _pack([[k[1], k[0], [seqs[i] for i in groups[k]]] for k in order])
        reply = await self._load(args=[blob, BITMAP_MAX_SEQ])
        persisted = [False] * len(keys)
        last: dict[Key, int | None] = {}
        for gi, key in enumerate(order):
            flags, state = reply[2 * gi], reply[2 * gi + 1]
            for i, f in zip(groups[key], flags, strict=True):
                persisted[i] = f == 49  # ord("1")
            last[key] = int(state) if state else None
        return persisted, last

    async def commit(self, persisted: Mapping[Key, Sequence[int]], last: Mapping[Key, int]) -> None:
        """After the batch is durable: mark its sequences persisted and advance the state."""
        keys = set(persisted) | set(last)
        if not keys:
            return
        blob = _pack([[k[1], k[0], last.get(k, -1), list(persisted.get(k, ()))] for k in keys])
        await self._commit(args=[blob, self._ttl, BITMAP_MAX_SEQ])
