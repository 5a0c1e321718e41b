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

from nadi.redis_keys import BITMAP_MAX_SEQ, dedup_key, seq_state_key

Key = tuple[int, int]  # (instrument_token, trading day ordinal)

_COMMIT = """
local groups = cmsgpack.unpack(ARGV[1])
local ttl = tonumber(ARGV[2])
for _, g in ipairs(groups) do
  local day, token, last, runs, big = g[1], g[2], g[3], g[4], g[5]
  local dk = 'nadi:dd:' .. day .. ':' .. token
  for _, r in ipairs(runs) do
    -- Bits a..b: single bits up to a byte boundary, whole 0xFF bytes, single bits after.
    local a, b = r[1], r[2]
    while a <= b and a % 8 ~= 0 do redis.call('SETBIT', dk, a, 1); a = a + 1 end
    local full = math.floor((b - a + 1) / 8)
    if full > 0 then
      redis.call('SETRANGE', dk, a / 8, string.rep('\\255', full))
      a = a + full * 8
    end
    while a <= b do redis.call('SETBIT', dk, a, 1); a = a + 1 end
  end
  if #runs > 0 then redis.call('EXPIRE', dk, ttl) end
  if #big > 0 then
    redis.call('SADD', dk .. ':big', unpack(big))
    redis.call('EXPIRE', dk .. ':big', ttl)
  end
  if last >= 0 then
    local sk = 'nadi:seq:' .. day
    local cur = redis.call('HGET', sk, token)
    if (not cur) or tonumber(cur) < last then redis.call('HSET', sk, token, last) end
    redis.call('EXPIRE', sk, ttl)
  end
end
return 1
"""


def runs_of(seqs: Sequence[int]) -> list[list[int]]:
    """Sorted, merged [first, last] runs of the given sequence numbers."""
    runs: list[list[int]] = []
    for q in sorted(set(seqs)):
        if runs and q == runs[-1][1] + 1:
            runs[-1][1] = q
        else:
            runs.append([q, q])
    return runs


_pack = msgspec.msgpack.Encoder().encode


class TickState:
    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl = ttl_s
        self._commit = client.register_script(_COMMIT)

    async def load(
        self, keys: Sequence[Key], seqs: Sequence[int]
    ) -> tuple[list[bool], dict[Key, int | None]]:
        """For each tick (given by its key and sequence): already persisted? And the last
        sequence per (token, day), None where Redis has no state. One pipelined round trip:
        a GETRANGE of the bitmap bytes covering each instrument's sequences in the batch."""
        groups: dict[Key, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        pipe = self._client.pipeline(transaction=False)
        plan: list[tuple[Key, list[int], list[int], int]] = []
        for key, idxs in groups.items():
            small = [i for i in idxs if seqs[i] < BITMAP_MAX_SEQ]
            big = [i for i in idxs if seqs[i] >= BITMAP_MAX_SEQ]
            dk = dedup_key(key[1], key[0])
            first_byte = min(seqs[i] for i in small) // 8 if small else 0
            if small:
                pipe.getrange(dk, first_byte, max(seqs[i] for i in small) // 8)
            if big:
                pipe.smismember(dk + ":big", [seqs[i] for i in big])
            plan.append((key, small, big, first_byte))
        days = sorted({k[1] for k in groups})
        for day in days:
            pipe.hmget(seq_state_key(day), [k[0] for k in groups if k[1] == day])
        replies = await pipe.execute()
        persisted = [False] * len(keys)
        pos = 0
        for _key, small, big, first_byte in plan:
            if small:
                bits: bytes = replies[pos]
                pos += 1
                for i in small:
                    q = seqs[i]
                    b = q // 8 - first_byte
                    # Redis bitmaps are big-endian within a byte: bit 0 is the 0x80 bit.
                    persisted[i] = b < len(bits) and bool(bits[b] & (0x80 >> (q % 8)))
            if big:
                for i, flag in zip(big, replies[pos], strict=True):
                    persisted[i] = bool(flag)
                pos += 1
        last: dict[Key, int | None] = {}
        for day, values in zip(days, replies[pos:], strict=True):
            for key, v in zip([k for k in groups if k[1] == day], values, strict=True):
                last[key] = int(v) if v is not None else None
        return persisted, last

    async def commit(self, persisted: Mapping[Key, Sequence[int]], last: Mapping[Key, int]) -> None:
        """After the batch is durable: mark its sequences persisted and advance the state."""
        keys = set(persisted) | set(last)
        if not keys:
            return
        groups = []
        for k in keys:
            seqs = persisted.get(k, ())
            small = [q for q in seqs if q < BITMAP_MAX_SEQ]
            big = [q for q in seqs if q >= BITMAP_MAX_SEQ]
            groups.append([k[1], k[0], last.get(k, -1), runs_of(small), big])
        await self._commit(args=[_pack(groups), self._ttl])
