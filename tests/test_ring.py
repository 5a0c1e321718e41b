"""RingWriter's idempotence rules against a real Redis."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from nadi.ring import IN_ORDER, NEW_LATE, STORED_LATE, RingWriter
from tests.feedgen import tick

TOKEN, DAY = 225537, 20_000


async def _seqs(r: aioredis.Redis) -> list[int]:
    entries: Any = await r.xrange(f"nadi:ring:{TOKEN}")
    return [orjson.loads(f[b"d"])["sequence_id"] for _, f in entries]


async def test_redelivery_never_appends_twice_and_stored_late_ticks_respect_the_floor(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.flushdb()
    ring = RingWriter(redis_client, maxlen=1000, ttl_s=600)
    t0 = time.time_ns()
    t = {s: tick(TOKEN, s, t0 + s) for s in range(1, 12)}

    async def append(seqs: list[int], mode: int) -> list[str | None]:
        status = "OK" if mode == IN_ORDER else "RECOVERED"
        return await ring.append(
            [t[s] for s in seqs], [DAY] * len(seqs), [status] * len(seqs), [mode] * len(seqs)
        )

    assert all(await append([5, 6, 9], IN_ORDER))  # 5 is the floor: the ring starts there
    assert await append([5, 6, 9], IN_ORDER) == [None, None, None]  # a redelivered batch
    # Already stored, and the ring started after them: not behind the floor.
    assert await append([2, 4], STORED_LATE) == [None, None]
    # Already stored but above the floor and not in the ring (its append was cut off by a
    # crash after the database write): goes in, once.
    assert (await append([7], STORED_LATE))[0]
    assert await append([7], STORED_LATE) == [None]
    # New to the database: goes in whatever the floor, once.
    assert (await append([3, 8], NEW_LATE))[0]
    assert await append([3, 8], NEW_LATE) == [None, None]
    assert await _seqs(redis_client) == [5, 6, 9, 7, 3, 8]
    await redis_client.flushdb()  # Redis lost its keys: no floor, so no stored tick goes in
    assert await append([4], STORED_LATE) == [None]
    assert all(await append([10, 11], IN_ORDER))
    assert await _seqs(redis_client) == [10, 11]
