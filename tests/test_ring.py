"""RingWriter's idempotence rules and its check against the database's state, on a real Redis."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis

from nadi.redis_keys import RedisKeys
from nadi.ring import AHEAD, BEHIND, IN_ORDER, LOST, NEW_LATE, STORED_LATE, RingCheck, RingWriter
from tests.feedgen import tick

TOKEN, DAY = 225537, 20_000


async def _seqs(r: aioredis.Redis, keys: RedisKeys) -> list[int]:
    entries: Any = await r.xrange(keys.ring(TOKEN))
    return [orjson.loads(f[b"d"])["sequence_id"] for _, f in entries]


async def test_appends_are_idempotent_and_stored_late_ticks_respect_the_floor(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.flushdb()
    keys = RedisKeys(uuid.uuid4().hex)
    ring = RingWriter(redis_client, keys, maxlen=1000, ttl_s=600)
    t0 = time.time_ns()
    t = {s: tick(TOKEN, s, t0 + s) for s in range(1, 13)}

    async def append(seqs: list[int], mode: int) -> list[str | None]:
        status = "OK" if mode == IN_ORDER else "RECOVERED"
        return await ring.append(
            [t[s] for s in seqs], [DAY] * len(seqs), [status] * len(seqs), [mode] * len(seqs)
        )

    # Stored ticks cannot start a ring: nothing anchors them.
    assert await append([4], STORED_LATE) == [None]
    assert all(await append([5, 6, 9], IN_ORDER))  # 5 is the floor: the ring starts there
    assert await append([5, 6, 9], IN_ORDER) == [None, None, None]  # a redelivered batch
    # Already stored, and the ring started after them: not behind the floor.
    assert await append([2, 4], STORED_LATE) == [None, None]
    # Stored in order and in the ring, then seen again as stored (a redelivery after the
    # state was reloaded from the database): not twice.
    assert await append([6], STORED_LATE) == [None]
    # Already stored but above the floor and not in the ring (its append was cut off by a
    # crash after the database write): goes in, once.
    assert (await append([7], STORED_LATE))[0]
    assert await append([7], STORED_LATE) == [None]
    # New to the database: goes in whatever the floor, once.
    assert all(await append([3, 8], NEW_LATE))
    assert await append([3, 8], NEW_LATE) == [None, None]
    assert await _seqs(redis_client, keys) == [5, 6, 9, 7, 3, 8]
    # Another database's keys are another ring.
    other = RingWriter(redis_client, RedisKeys(uuid.uuid4().hex), maxlen=1000, ttl_s=600)
    assert all(await other.append([t[5]], [DAY], ["OK"]))
    await redis_client.flushdb()  # Redis lost its keys: no floor, so no stored tick goes in
    assert await append([4], STORED_LATE) == [None]
    assert all(await append([10, 11], IN_ORDER))
    assert await _seqs(redis_client, keys) == [10, 11]


async def test_check_restarts_a_ring_behind_the_database_and_keeps_one_ahead(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.flushdb()
    keys = RedisKeys(uuid.uuid4().hex)
    ring = RingWriter(redis_client, keys, maxlen=1000, ttl_s=600)
    t0 = time.time_ns()
    t = {s: tick(TOKEN, s, t0 + s) for s in range(1, 20)}
    assert all(await ring.append([t[s] for s in (1, 2, 3)], [DAY] * 3, ["OK"] * 3))
    other_day = DAY - 1
    assert await ring.check({(TOKEN, DAY): 3, (TOKEN, other_day): None}) == []
    # The database is ahead (Redis came back from an older snapshot): the ring restarts after
    # the database's last, and stored ticks below that stay out.
    assert await ring.check({(TOKEN, DAY): 6}) == [RingCheck(TOKEN, DAY, BEHIND)]
    assert await _seqs(redis_client, keys) == []
    assert await ring.append([t[5]], [DAY], ["OK"], [STORED_LATE]) == [None]
    assert all(await ring.append([t[7], t[8]], [DAY] * 2, ["OK"] * 2))
    assert await ring.append([t[7]], [DAY], ["OK"], [STORED_LATE]) == [None]
    assert await _seqs(redis_client, keys) == [7, 8]
    # The database is behind (restored from an older dump): the ring is kept, and the
    # redelivered ticks do not go in twice.
    assert await ring.check({(TOKEN, DAY): 7}) == [RingCheck(TOKEN, DAY, AHEAD)]
    assert await ring.append([t[8]], [DAY], ["OK"]) == [None]
    assert await _seqs(redis_client, keys) == [7, 8]
    # No ring state at all while the database has ticks (Redis flushed): restarted too.
    await redis_client.flushdb()
    assert await ring.check({(TOKEN, DAY): 8}) == [RingCheck(TOKEN, DAY, LOST)]
    assert await ring.append([t[8]], [DAY], ["OK"], [STORED_LATE]) == [None]
    assert all(await ring.append([t[9]], [DAY], ["OK"]))
    assert await _seqs(redis_client, keys) == [9]


async def test_an_append_behind_its_expected_sequence_restarts_the_ring(
    redis_client: aioredis.Redis,
) -> None:
    """Redis came back from an older snapshot while the worker ran (its memory checked the
    ring on first touch, long ago): the next in-order append expects the ring at the last
    sequence it classified against, finds it behind and restarts it after that, so the ring
    stays a gap-free tail instead of old entries, a hole, then new ones."""
    await redis_client.flushdb()
    keys = RedisKeys(uuid.uuid4().hex)
    ring = RingWriter(redis_client, keys, maxlen=1000, ttl_s=600)
    t0 = time.time_ns()
    t = {s: tick(TOKEN, s, t0 + s) for s in range(1, 20)}

    async def append(seqs: list[int], expect: int) -> tuple[list[str | None], list[RingCheck]]:
        n = len(seqs)
        return await ring.append_expecting(
            [t[s] for s in seqs], [DAY] * n, ["OK"] * n, [IN_ORDER] * n, [expect] * n
        )

    offsets, restarted = await append([1, 2, 3], -1)
    assert all(offsets) and restarted == []
    offsets, restarted = await append([4, 5], 3)  # as expected: nothing restarted
    assert all(offsets) and restarted == []
    # The snapshot Redis restarts from has the ring up to 3; the worker appended up to 5.
    entries: Any = await redis_client.xrange(keys.ring(TOKEN))
    await redis_client.xdel(keys.ring(TOKEN), *[e[0] for e in entries[3:]])
    await redis_client.hset(keys.ring_top(DAY), str(TOKEN), "3")
    for seq in (4, 5):
        await redis_client.setbit(keys.ring_appended(DAY, TOKEN), seq, 0)
    assert await _seqs(redis_client, keys) == [1, 2, 3]
    offsets, restarted = await append([6, 7], 5)
    assert all(offsets) and restarted == [RingCheck(TOKEN, DAY, BEHIND)]
    assert await _seqs(redis_client, keys) == [6, 7]
    # Flushed: no ring state at all.
    await redis_client.flushdb()
    offsets, restarted = await append([8], 7)
    assert all(offsets) and restarted == [RingCheck(TOKEN, DAY, LOST)]
    assert await _seqs(redis_client, keys) == [8]
    # A redelivery below the restart point stays out (the floor).
    assert await ring.append([t[7]], [DAY], ["OK"], [STORED_LATE]) == [None]
