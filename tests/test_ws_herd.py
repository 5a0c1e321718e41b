"""Many subscribers at once, and catch-up paced by the client (issue 10, Deliver 3).

The API runs as a subprocess (as in production: its own process and event loop) against the
real Redis and TimescaleDB; history is stored straight into ``ticks`` and into the rings, and
live ticks go through the processor's own RingWriter (ring + live stream in one call), so
the test controls exactly which tick is where.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from nadi.redis_keys import RedisKeys
from nadi.settings import Settings
from nadi.times import NS
from tests.processor_util import reset_state
from tests.ws_util import (
    LiveFeed,
    Received,
    free_port,
    iso,
    ring_append,
    send,
    spawn_api,
    store_history,
    ts_of,
    ws_connect,
)


@pytest.fixture
async def env(migrated: Settings, pg: asyncpg.Connection) -> Settings:
    await reset_state(pg, migrated)  # an empty database and Redis db: "the ring lost"
    return migrated


@contextlib.asynccontextmanager
async def api_process(s: Settings, log: str) -> AsyncIterator[str]:
    port = free_port()
    proc = await spawn_api(s, port, log)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


HERD = 1000
HERD_TOKENS = [910_001 + i for i in range(20)]


async def test_a_thundering_herd_of_subscribers_all_catch_up_then_go_live(
    env: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis, tmp_path: object
) -> None:
    # Per instrument: ticks 1-100 only in the database, 101-200 in the ring (its first entry is
    # 101, so catch-up from tick 1 reads both), 201-210 live once every client is synced.
    base = time.time_ns() - 600 * NS
    keys = await RedisKeys.load(pg)
    await store_history(pg, HERD_TOKENS, range(1, 101), base)
    await ring_append(redis_client, keys, HERD_TOKENS, range(101, 201), base)
    since = iso(ts_of(base, 1))
    synced = 0
    all_synced = asyncio.Event()
    opened: list[float] = []

    async def client(k: int, host: str) -> Received:
        nonlocal synced
        tok = HERD_TOKENS[k % len(HERD_TOKENS)]
        got = Received()
        async with ws_connect(host, max_size=None, open_timeout=120) as ws:
            opened.append(time.monotonic())
            await send(ws, {"op": "subscribe", "instruments": [tok], "since": since})
            counted = False
            while not got.has(tok, 210) and not got.errors:
                got.add_frame(await asyncio.wait_for(ws.recv(), 120))
                if not counted and tok in got.synced:
                    counted = True
                    synced += 1
                    if synced == HERD:
                        all_synced.set()
        return got

    async with api_process(env, str(tmp_path) + "/api.log") as host:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(client(k, host)) for k in range(HERD)]
        everyone = asyncio.create_task(all_synced.wait())
        pending: set[asyncio.Task[Any]] = {everyone, *tasks}
        while not everyone.done():  # a client that ends before everyone synced has failed
            done, pending = await asyncio.wait(
                pending, timeout=120, return_when=asyncio.FIRST_COMPLETED
            )
            assert done, f"only {synced} of {HERD} clients synced in 120 s"
            for t in done:
                if t is not everyone:
                    t.result()
                    raise AssertionError("a client finished before the live ticks were sent")
        synced_s = time.monotonic() - t0
        await ring_append(redis_client, keys, HERD_TOKENS, range(201, 211), base)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        total_s = time.monotonic() - t0
    print(
        f"herd: {HERD} clients opened within {max(opened) - min(opened):.2f} s; "
        f"all synced after {synced_s:.2f} s; all live after {total_s:.2f} s"
    )
    for k, got in enumerate(results):
        tok = HERD_TOKENS[k % len(HERD_TOKENS)]
        assert not got.errors and got.dropped == 0 and not got.other, (k, got.errors)
        assert got.seqs[tok] == list(range(1, 211)), k
        assert got.from_db[tok] == 100  # 1-100 from the database, the rest from the ring
        assert got.synced == {tok: 1} and got.synced_at[tok] == 200  # catch-up, synced, live


PACED_TOKENS = [920_001 + i for i in range(10)]


async def test_catch_up_from_the_database_is_paced_by_a_reading_client(
    env: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis, tmp_path: object
) -> None:
    # 10 instruments x ticks 1-900 in the database only (the ring lost); 4,000 ticks/s flow
    # live from 901 on, before and during the catch-up. A client that reads (a little slowly:
    # frames pile up on the server) gets every tick, in order, once, and no ``dropped``.
    base = time.time_ns() - 600 * NS
    keys = await RedisKeys.load(pg)
    await store_history(pg, PACED_TOKENS, range(1, 901), base)
    async with api_process(env, str(tmp_path) + "/api.log") as host:
        feed = LiveFeed(redis_client, keys, PACED_TOKENS, 901, base, rate=4000).start()
        try:
            deadline = time.monotonic() + 30
            while feed.last < 1000:  # the ring has restarted with live ticks
                assert time.monotonic() < deadline, "the live feed does not advance"
                await asyncio.sleep(0.01)
            got = Received()
            async with ws_connect(host, max_size=None) as ws:
                t_sub = time.monotonic()
                await send(
                    ws,
                    {"op": "subscribe", "instruments": PACED_TOKENS, "since": iso(ts_of(base, 1))},
                )
                while len(got.synced) < len(PACED_TOKENS) and not got.errors:
                    got.add_frame(await asyncio.wait_for(ws.recv(), 30))
                    await asyncio.sleep(0.005)  # a client that reads, not one that races
                catchup_s = time.monotonic() - t_sub
                live_from = feed.last
                while feed.last < live_from + 400:  # a second of live ticks after the switch
                    got.add_frame(await asyncio.wait_for(ws.recv(), 30))
                last = await feed.stop()
                while not all(got.has(t, last) for t in PACED_TOKENS) and not got.errors:
                    got.add_frame(await asyncio.wait_for(ws.recv(), 30))
        finally:
            await feed.stop()
    print(f"paced catch-up: 10 x 900 from the database in {catchup_s:.2f} s; live to {last}")
    assert not got.errors and got.dropped == 0 and not got.other
    for tok in PACED_TOKENS:
        assert got.seqs[tok] == list(range(1, last + 1)), tok  # every tick, in order, once
        assert got.from_db[tok] == 900 and got.synced[tok] == 1
