"""Per-batch Redis state of the processor: which sequences are already persisted (dedup) and
the SequenceTracker's last sequence per instrument and day.

Both are read before a batch is written and updated only after it is durable, so a key can
never claim a tick that was not persisted. Redis may lose them at any time; the database's
unique key and the fallback to ``max(sequence_id)`` keep the result exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from nadi.redis_keys import BITMAP_MAX_SEQ, dedup_key, seq_state_key
from nadi.tick import Tick

Key = tuple[int, int]  # (instrument_token, trading day ordinal)

_COMMIT = """
local ttl, maxbit = tonumber(ARGV[1]), tonumber(ARGV[2])
local i = 3
while i <= #ARGV do
  local day, token, last, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  local dk = 'nadi:dd:' .. day .. ':' .. token
  local big = false
  for j = 0, n - 1 do
    local s = tonumber(ARGV[i + j])
    if s < maxbit then redis.call('SETBIT', dk, s, 1)
    else redis.call('SADD', dk .. ':big', s); big = true end
  end
  i = i + n
  if n > 0 then redis.call('EXPIRE', dk, ttl) end
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


class TickState:
    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl = ttl_s
        self._commit = client.register_script(_COMMIT)

    async def load(self, ticks: Sequence[Tick]) -> tuple[list[bool], dict[Key, int | None]]:
        """For each tick: already persisted? And the last sequence per (token, day) (None: unknown)."""
        groups: dict[Key, list[int]] = defaultdict(list)
        for i, t in enumerate(ticks):
            groups[(t.instrument_token, t.trading_day_ordinal)].append(i)
        pipe = self._client.pipeline(transaction=False)
        plan: list[tuple[Key, list[int], list[int]]] = []
        for key, idxs in groups.items():
            small = [i for i in idxs if ticks[i].sequence_id < BITMAP_MAX_SEQ]
            big = [i for i in idxs if ticks[i].sequence_id >= BITMAP_MAX_SEQ]
            dk = dedup_key(key[1], key[0])
            if small:
                cmd: list[object] = []
                for i in small:
                    cmd += ("GET", "u1", ticks[i].sequence_id)
                pipe.execute_command("BITFIELD_RO", dk, *cmd)
            if big:
                pipe.smismember(dk + ":big", [ticks[i].sequence_id for i in big])
            plan.append((key, small, big))
        days = sorted({k[1] for k in groups})
        for day in days:
            pipe.hgetall(seq_state_key(day))
        replies = await pipe.execute()
        persisted = [False] * len(ticks)
        pos = 0
        for _key, small, big in plan:
            for part in (small, big):
                if part:
                    for i, flag in zip(part, replies[pos], strict=True):
                        persisted[i] = bool(flag)
                    pos += 1
        last: dict[Key, int | None] = {}
        for day, state in zip(days, replies[pos:], strict=True):
            for key in groups:
                if key[1] == day:
                    v = state.get(str(key[0]).encode())
                    last[key] = int(v) if v is not None else None
        return persisted, last

    async def commit(self, persisted: Mapping[Key, Sequence[int]], last: Mapping[Key, int]) -> None:
        """After the batch is durable: mark its sequences persisted and advance the state."""
        args: list[object] = [self._ttl, BITMAP_MAX_SEQ]
        for key in set(persisted) | set(last):
            seqs = persisted.get(key, ())
            args += (key[1], key[0], last.get(key, -1), len(seqs), *seqs)
        if len(args) > 2:
            await self._commit(args=args)
