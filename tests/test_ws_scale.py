"""Live fan-out at scale (issue 12): conflation for slow clients, and several API processes.

Real Redis and TimescaleDB; live ticks go through the processor's own RingWriter (ring + live
stream in one call), so the test controls exactly which tick is where.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any, cast

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from api.ws.hub import Hub
from nadi.redis_keys import RedisKeys
from nadi.settings import Settings
from nadi.times import NS
from tests.processor_util import reset_state
from tests.ws_util import (
    Received,
    free_port,
    iso,
    ring_append,
    send,
    serving,
    spawn_api,
    ts_of,
    ws_connect,
)

TOKENS = [920_001 + i for i in range(5)]


@pytest.fixture
async def env(migrated: Settings, pg: asyncpg.Connection) -> Settings:
    await reset_state(pg, migrated)
    return migrated


def _tiny_socket(host: str) -> socket.socket:
    """A client socket with a small receive buffer: a client that stops reading fills the
    server's buffers quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    h, _, p = host.partition(":")
    sock.connect((h, int(p)))
    sock.setblocking(False)
    return sock


async def _synced(ws: ClientConnection, tokens: list[int]) -> None:
    pending = set(tokens)
    while pending:
        data = json.loads(await asyncio.wait_for(ws.recv(), 10))
        for m in data if isinstance(data, list) else [data]:
            assert m["type"] in ("synced", "tick"), m
            if m["type"] == "synced":
                pending.discard(m["instrument_token"])


class Conflated:
    """What a conflating client got: per instrument, tick sequence ids (and prices) and the
    ``skipped`` counts of ``conflated`` notices, each notice right before a tick of its own."""

    def __init__(self) -> None:
        self.seqs: dict[int, list[int]] = {t: [] for t in TOKENS}
        self.skipped: dict[int, int] = dict.fromkeys(TOKENS, 0)
        self.notices = 0
        self.other: list[dict[str, Any]] = []

    def add(self, data: str | bytes) -> None:
        decoded = json.loads(data)
        msgs = decoded if isinstance(decoded, list) else [decoded]
        for i, m in enumerate(msgs):
            if m["type"] == "tick":
                self.seqs[m["instrument_token"]].append(m["sequence_id"])
            elif m["type"] == "conflated":
                nxt = msgs[i + 1] if i + 1 < len(msgs) else None
                assert nxt is not None and nxt["type"] == "tick", msgs[i : i + 2]
                assert nxt["instrument_token"] == m["instrument_token"]
                assert m["skipped"] > 0
                self.skipped[m["instrument_token"]] += m["skipped"]
                self.notices += 1
            else:
                self.other.append(m)


async def test_conflating_slow_client_ends_on_the_newest_price_of_every_instrument(
    env: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    q, n = 100, 10_000  # queue of 100 live messages; 10,000 ticks per instrument
    s = env.model_copy(update={"ws_queue_size": q, "ws_stall_timeout_s": 60.0})
    keys = await RedisKeys.load(pg)
    base = time.time_ns() - 120 * NS
    async with serving(s) as (host, app):
        hub: Hub = app.state.ws_hub
        async with (
            ws_connect(host) as exact,
            ws_connect(host, sock=_tiny_socket(host), max_queue=1, close_timeout=1) as slow,
        ):
            await send(exact, {"op": "subscribe", "instruments": TOKENS})
            await _synced(exact, TOKENS)
            await send(slow, {"op": "subscribe", "instruments": TOKENS, "mode": "conflate"})
            await _synced(slow, TOKENS)
            got = Received()

            async def read_exact() -> None:
                while not all(got.seqs.get(t, [0])[-1] >= n for t in TOKENS):
                    got.add_frame(await asyncio.wait_for(exact.recv(), 30))

            reader = asyncio.create_task(read_exact())
            peak = 0
            for first in range(1, n + 1, 100):  # 100 ticks per instrument per live entry
                await ring_append(redis_client, keys, TOKENS, range(first, first + 100), base)
                await asyncio.sleep(0.005)
                peak = max(peak, max(c.live_count for c in hub.connections))
            await asyncio.wait_for(reader, 60)
            (conn,) = [c for c in hub.connections if c.skipped_total]  # the slow one
            assert conn.live_count <= q and conn.dropped_total == 0
            late = Conflated()  # now the slow client reads everything queued for it
            deadline = time.monotonic() + 30
            while not all(late.seqs[t] and late.seqs[t][-1] == n for t in TOKENS):
                late.add(
                    await asyncio.wait_for(slow.recv(), max(0.01, deadline - time.monotonic()))
                )
    print(f"conflation: slow client got {sum(map(len, late.seqs.values()))} ticks, "
          f"skipped {sum(late.skipped.values())} in {late.notices} notices")  # fmt: skip
    # The exact-stream client lost nothing.
    assert got.dropped == 0 and not got.errors
    assert all(got.seqs[t] == list(range(1, n + 1)) for t in TOKENS)
    assert peak <= q
    # The slow one: in order, the newest tick of every instrument last, and every tick it
    # did not get counted as skipped (no ``dropped``, nothing else).
    assert not late.other, late.other[:3]
    assert late.notices > 0
    for t in TOKENS:
        seqs = late.seqs[t]
        assert seqs == sorted(set(seqs)) and seqs[-1] == n, t
        assert late.skipped[t] > 0 and len(seqs) + late.skipped[t] == n, t


def _worker_connections(api_pid: int, port: int) -> dict[int, int]:
    """Established /ws connections per API worker process (children of the supervisor)."""
    out: dict[int, int] = {}
    for child in psutil.Process(api_pid).children(recursive=True):
        with_port = [c for c in child.net_connections("tcp") if c.laddr and c.laddr.port == port]
        if any(c.status == psutil.CONN_LISTEN for c in with_port):
            out[child.pid] = sum(1 for c in with_port if c.status == psutil.CONN_ESTABLISHED)
    return out


async def test_several_api_processes_give_every_client_every_tick_once_in_order(
    env: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis, tmp_path: object
) -> None:
    # Ticks 1-100 in the ring before anyone connects (catch-up), then 101-1000 live while the
    # clients of both processes read.
    keys = await RedisKeys.load(pg)
    base = time.time_ns() - 300 * NS
    await ring_append(redis_client, keys, TOKENS, range(1, 101), base)
    port = free_port()
    host = f"127.0.0.1:{port}"
    proc = await spawn_api(env, port, str(tmp_path) + "/api.log", workers=2)
    clients: list[ClientConnection] = []
    try:
        deadline = time.monotonic() + 30
        while len(_worker_connections(proc.pid, port)) < 2:  # both workers listening
            assert time.monotonic() < deadline, "two API workers did not start"
            await asyncio.sleep(0.1)
        # Open connections until both processes hold some (the kernel picks the process).
        while len(clients) < 40:
            clients.append(await ws_connect(host, max_size=None).__aenter__())
            per = _worker_connections(proc.pid, port)
            if len(clients) >= 8 and min(per.values()) >= 2:
                break
        per = _worker_connections(proc.pid, port)
        assert len(per) == 2 and min(per.values()) >= 1, per
        print(f"API workers: connections per process {sorted(per.values())}")
        since = iso(ts_of(base, 1))
        for ws in clients:
            await send(ws, {"op": "subscribe", "instruments": TOKENS, "since": since})

        async def read(ws: ClientConnection) -> Received:
            got = Received()
            while not all(got.has(t, 1000) for t in TOKENS) and not got.errors:
                got.add_frame(await asyncio.wait_for(ws.recv(), 30))
            return got

        readers = [asyncio.create_task(read(ws)) for ws in clients]
        for first in range(101, 1001, 10):
            await ring_append(redis_client, keys, TOKENS, range(first, first + 10), base)
            await asyncio.sleep(0.01)
        results = await asyncio.wait_for(asyncio.gather(*readers), 60)
    finally:
        for ws in clients:
            await ws.close()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    for k, got in enumerate(results):
        assert not got.errors and got.dropped == 0 and not got.other, (k, got.errors)
        for t in TOKENS:
            assert got.seqs[t] == list(range(1, 1001)), (k, t)
            assert got.synced[t] == 1, (k, t)


def test_api_workers_setting_and_the_machine_default(settings: Settings) -> None:
    from api.cli import MAX_AUTO_WORKERS, workers_for_machine

    assert workers_for_machine(settings.model_copy(update={"api_workers": 3})) == 3
    cpus = len(os.sched_getaffinity(0))
    auto = workers_for_machine(settings.model_copy(update={"api_workers": 0}))
    assert auto == max(1, min(MAX_AUTO_WORKERS, cpus // 2))


def _worker_of(api_pid: int, port: int) -> dict[int, int]:
    """Client port -> the API worker process holding that connection."""
    out: dict[int, int] = {}
    for child in psutil.Process(api_pid).children(recursive=True):
        for c in child.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED:
                out[c.raddr.port] = child.pid
    return out


async def _admitted(ws: ClientConnection) -> bool:
    """True when the connection answers a ping; False when it is closed with 4029."""
    try:
        await send(ws, {"op": "ping"})
        data = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert data == {"type": "pong"}, data
        return True
    except ConnectionClosed as e:
        assert e.rcvd is not None and e.rcvd.code == 4029, e
        return False


async def test_connections_per_key_are_counted_over_all_api_processes(
    env: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis, tmp_path: object
) -> None:
    limit = 3
    s = env.model_copy(update={"ws_max_connections_per_key": limit})
    counts_key = f"{(await RedisKeys.load(pg)).live}:ws:conns"

    async def shared_total(expect: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            raw = cast(dict[bytes, bytes], await redis_client.hgetall(counts_key))
            total = sum(int(v) for v in raw.values())
            if total == expect:
                return
            assert time.monotonic() < deadline, (total, expect)
            await asyncio.sleep(0.05)

    port = free_port()
    host = f"127.0.0.1:{port}"
    proc = await spawn_api(s, port, str(tmp_path) + "/api.log", workers=2)
    held: list[ClientConnection] = []
    try:
        deadline = time.monotonic() + 30
        while len(_worker_connections(proc.pid, port)) < 2:
            assert time.monotonic() < deadline, "two API workers did not start"
            await asyncio.sleep(0.1)
        # Hold `limit` connections spread over both processes (the kernel picks the process:
        # replace one until they are spread), so that neither process alone is at the limit.
        for _ in range(40):
            while len(held) < limit:
                ws = await ws_connect(host).__aenter__()
                assert await _admitted(ws)
                held.append(ws)
            where = _worker_of(proc.pid, port)
            procs = {where[ws.local_address[1]] for ws in held}
            if len(procs) == 2:
                break
            await held.pop().close()
            await shared_total(limit - 1)
        assert len(procs) == 2, "connections never spread over both processes"
        await shared_total(limit)
        # Over the limit wherever it lands: refused with 4029, and not counted.
        for _ in range(4):
            async with ws_connect(host) as extra:
                assert not await _admitted(extra)
        await shared_total(limit)
        # One closed anywhere frees a place for the key on every process.
        await held.pop(0).close()
        await shared_total(limit - 1)
        ws = await ws_connect(host).__aenter__()
        assert await _admitted(ws)
        held.append(ws)
    finally:
        for ws in held:
            await ws.close()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
