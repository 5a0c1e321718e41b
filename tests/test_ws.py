"""The WebSocket hub against real Redis, TimescaleDB, Kafka and a real MarketDataProcessor,
served by a real uvicorn (in the test's event loop, so the test can inspect the hub)."""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from confluent_kafka import Producer
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.ws.hub import Hub
from nadi.ring import RingWriter
from nadi.settings import Settings
from nadi.times import NS
from tests.feedgen import msg, tick
from tests.kafka_util import produce, wait_caught_up
from tests.processor_util import private_settings, redis_keys, reset_state, running_worker
from tests.ws_util import recv_messages, send, serving, ws_connect

T1, T2 = 738561, 408065
# The module (the package's ``router`` attribute is the APIRouter itself).
ws_router = importlib.import_module("api.ws.router")


@pytest.fixture
async def env(migrated: Settings, pg: asyncpg.Connection) -> Settings:
    s = await private_settings(migrated)
    await reset_state(pg, s)
    return s


async def _expect(ws: ClientConnection, pred: Any, wait_s: float = 10) -> dict[str, Any]:
    """The first message satisfying ``pred`` (others are skipped)."""
    deadline = time.monotonic() + wait_s
    while True:
        for m in await recv_messages(ws, max(0.01, deadline - time.monotonic())):
            if pred(m):
                return m


async def _closed_code(ws: ClientConnection, wait_s: float = 10) -> int | None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), wait_s)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


# ---- admission and protocol errors ------------------------------------------------------------


async def test_admission_and_protocol_errors(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = env.model_copy(
        update={
            "api_keys": "k1,k2;k3:replay",
            "allowed_origins": "http://good.example",
            "ws_max_subscriptions": 3,
            "ws_max_connections_per_key": 2,
            "ws_max_message_bytes": 1024,
        }
    )
    monkeypatch.setattr(ws_router, "AUTH_TIMEOUT_S", 0.5)
    bearer = {"Authorization": "Bearer k1"}
    async with serving(s) as (host, _app):
        # No key at all: accepted, then closed 4001 when no auth message comes.
        async with ws_connect(host) as ws:
            assert await _closed_code(ws) == 4001
        # A bad key in the header: refused at the upgrade.
        with pytest.raises(InvalidStatus) as bad:
            async with ws_connect(host, additional_headers={"Authorization": "Bearer nope"}):
                pass
        assert bad.value.response.status_code == 401
        # A bad key in the auth message.
        async with ws_connect(host) as ws:
            await send(ws, {"op": "auth", "key": "nope"})
            assert await _closed_code(ws) == 4001
        # A valid key without the read scope, either way in: an error frame, then 4003.
        async with ws_connect(host, additional_headers={"Authorization": "Bearer k3"}) as ws:
            assert (await recv_messages(ws))[0]["code"] == "forbidden"
            assert await _closed_code(ws) == 4003
        async with ws_connect(host) as ws:
            await send(ws, {"op": "auth", "key": "k3"})
            assert (await recv_messages(ws))[0]["code"] == "forbidden"
            assert await _closed_code(ws) == 4003
        # Origin not on the allowlist: HTTP 403; an allowed one (and none at all) is fine.
        with pytest.raises(InvalidStatus) as forbidden:
            async with ws_connect(host, origin="http://evil.example", additional_headers=bearer):
                pass
        assert forbidden.value.response.status_code == 403
        async with ws_connect(host, origin="http://good.example", additional_headers=bearer) as ws:
            await send(ws, {"op": "ping"})
            assert (await recv_messages(ws)) == [{"type": "pong"}]

        # A good key by message, then the protocol errors: each answered, connection kept.
        async with ws_connect(host) as ws:
            await send(ws, {"op": "auth", "key": "k2"})
            cases: list[tuple[str, str]] = [
                ("not json", "bad_json"),
                ('{"op": "nope"}', "unknown_op"),
                ('{"instruments": [1]}', "unknown_op"),
                ('{"op": "subscribe", "instruments": [-5]}', "bad_message"),
                ('{"op": "subscribe", "instruments": ["738561"]}', "bad_message"),
                ('{"op": "subscribe", "instruments": [true]}', "bad_message"),
                ('{"op": "subscribe", "instruments": [1], "since": "yesterday"}', "bad_since"),
                (
                    '{"op": "subscribe", "instruments": [1], "since": "2025-01-06T09:15"}',
                    "bad_since",
                ),
                ('{"op": "subscribe", "instruments": [1, 2, 3, 4]}', "too_many_subscriptions"),
            ]
            for text, code in cases:
                await ws.send(text)
                (m,) = await recv_messages(ws)
                assert m["type"] == "error" and m["code"] == code, (text, m)
            # Unknown instruments are fine (the master can lag): synced at once, no offset.
            await send(ws, {"op": "subscribe", "instruments": [1, 2, 3]})
            got: list[dict[str, Any]] = []
            while len(got) < 3:  # one frame or several (coalescing)
                got += await recv_messages(ws)
            assert sorted(m["instrument_token"] for m in got) == [1, 2, 3]
            assert all(m == {**m, "type": "synced", "offset": None} for m in got)
            await send(ws, {"op": "subscribe", "instruments": [4]})
            assert (await recv_messages(ws))[0]["code"] == "too_many_subscriptions"
            await send(ws, {"op": "unsubscribe", "instruments": [3]})
            await send(ws, {"op": "subscribe", "instruments": [4]})
            assert (await recv_messages(ws))[0] == {
                "type": "synced",
                "instrument_token": 4,
                "offset": None,
            }
            await send(ws, {"op": "ping"})
            assert (await recv_messages(ws)) == [{"type": "pong"}]

            # Oversized client message: closed with 1009.
            await ws.send(json.dumps({"op": "ping", "pad": "x" * 2000}))
            assert await _closed_code(ws) == 1009

        # Connections per key: the third with k1 is closed 4029; k2 is unaffected. (Admission
        # follows the upgrade and asks Redis: a pong says a and b were admitted before c came.)
        async with (
            ws_connect(host, additional_headers=bearer) as a,
            ws_connect(host, additional_headers=bearer) as b,
        ):
            for ws in (a, b):
                await send(ws, {"op": "ping"})
                assert (await recv_messages(ws)) == [{"type": "pong"}]
            async with ws_connect(host, additional_headers=bearer) as c:
                assert await _closed_code(c) == 4029
            async with ws_connect(host, additional_headers={"Authorization": "Bearer k2"}) as d:
                await send(d, {"op": "ping"})
                assert (await recv_messages(d)) == [{"type": "pong"}]
            for ws in (a, b):
                await send(ws, {"op": "ping"})
                assert (await recv_messages(ws)) == [{"type": "pong"}]


# ---- catch-up and the switch to live ----------------------------------------------------------


def _iso(ts_ns: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_ns // 1000)).isoformat()


async def _produce_paced(
    s: Settings, token: int, seqs: range, base_ns: int, chunk: int = 100, pause_s: float = 0.02
) -> None:
    """Ticks ``seqs`` of ``token`` (exchange_ts = base + seq ms, plus as many of another
    instrument) in small paced chunks through one producer, so live ticks keep arriving
    while clients catch up."""

    def run() -> None:
        p = Producer({"bootstrap.servers": s.kafka_bootstrap, "linger.ms": 2, "acks": "all"})
        for i in range(0, len(seqs), chunk):
            for q in seqs[i : i + chunk]:
                for m in (
                    msg(tick(token, q, base_ns + q * 1_000_000)),
                    msg(tick(T2, q, base_ns + q * 1_000_000 + 500)),  # noise
                ):
                    p.produce(s.topic_ticks, value=m[1], key=m[0])
            assert p.flush(30) == 0
            time.sleep(pause_s)

    await asyncio.to_thread(run)


class Seen:
    """What one client received for one instrument."""

    def __init__(self) -> None:
        self.ticks: list[dict[str, Any]] = []
        self.synced: list[dict[str, Any]] = []
        self.dropped = 0
        self.errors: list[dict[str, Any]] = []

    @property
    def seqs(self) -> list[int]:
        return [t["sequence_id"] for t in self.ticks]


async def _collect(
    ws: ClientConnection, token: int, last_seq: int, wait_s: float = 60, synced: bool = True
) -> Seen:
    """Messages until the tick ``last_seq`` of ``token`` (and ``synced``, if expected)."""
    seen = Seen()
    deadline = time.monotonic() + wait_s
    while (
        (synced and not seen.synced) or not seen.ticks or seen.ticks[-1]["sequence_id"] < last_seq
    ):
        for m in await recv_messages(ws, max(0.01, deadline - time.monotonic())):
            if m["type"] == "tick" and m["instrument_token"] == token:
                seen.ticks.append(m)
            elif m["type"] == "synced":
                seen.synced.append(m)
            elif m["type"] == "dropped":
                seen.dropped += m["count"]
            elif m["type"] == "error":
                seen.errors.append(m)
    return seen


async def _ring_offset(r: aioredis.Redis, token: int, seq: int) -> str:
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await r.xrange((await redis_keys()).ring(token))
    )
    for entry_id, fields in entries:
        if json.loads(fields[b"d"])["sequence_id"] == seq:
            return entry_id.decode()
    raise AssertionError(f"sequence {seq} not in the ring")


async def test_catch_up_inside_the_ring_then_live(
    env: Settings, redis_client: aioredis.Redis
) -> None:
    base = time.time_ns() - 120 * NS
    await asyncio.to_thread(
        produce,
        env.kafka_bootstrap,
        env.topic_ticks,
        [msg(tick(T1, q, base + q * 1_000_000)) for q in range(1, 401)],
    )
    async with running_worker(env), serving(env) as (host, _app):
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks)
        offset_200 = await _ring_offset(redis_client, T1, 200)
        async with (
            ws_connect(host) as by_time,
            ws_connect(host) as by_offset,
            ws_connect(host) as live,
        ):
            feeding = asyncio.create_task(_produce_paced(env, T1, range(401, 1401), base))
            await send(live, {"op": "subscribe", "instruments": [T1]})
            await asyncio.sleep(0.3)  # live ticks are flowing while the others subscribe
            await send(
                by_time,
                {"op": "subscribe", "instruments": [T1], "since": _iso(base + 101 * 1_000_000)},
            )
            await send(by_offset, {"op": "subscribe", "instruments": [T1], "since": offset_200})
            seen = await asyncio.gather(
                _collect(by_time, T1, 1400), _collect(by_offset, T1, 1400), _collect(live, T1, 1400)
            )
            await feeding
    t, o, lv = seen
    assert t.seqs == list(range(101, 1401))
    assert o.seqs == list(range(201, 1401))
    assert lv.seqs == list(range(lv.seqs[0], 1401)) and lv.seqs[0] > 400
    for s in seen:
        assert len(s.synced) == 1 and s.dropped == 0 and not s.errors
        assert all(x["offset"] for x in s.ticks)  # all from the ring or live
        offsets = [tuple(map(int, x["offset"].split("-"))) for x in s.ticks]
        assert offsets == sorted(offsets)
    # synced carries the offset of the last tick sent before it (the catch-up/live seam).
    for s in (t, o):
        assert s.synced[0]["offset"] in {x["offset"] for x in s.ticks}


async def test_catch_up_older_than_the_ring_reads_the_database(
    env: Settings, redis_client: aioredis.Redis
) -> None:
    s = env.model_copy(update={"ring_maxlen": 100})
    base = time.time_ns() - 120 * NS
    await asyncio.to_thread(
        produce,
        s.kafka_bootstrap,
        s.topic_ticks,
        [msg(tick(T1, q, base + q * 1_000_000)) for q in range(1, 3001)],
    )
    async with running_worker(s), serving(s) as (host, _app):
        await wait_caught_up(s.kafka_bootstrap, s.group_id, s.topic_ticks)
        ring = (await redis_keys()).ring(T1)
        assert await redis_client.xlen(ring) < 1000  # trimmed: older ticks only in the DB
        async with ws_connect(host) as a, ws_connect(host) as b:
            feeding = asyncio.create_task(_produce_paced(s, T1, range(3001, 4001), base))
            await asyncio.sleep(0.3)
            await send(a, {"op": "subscribe", "instruments": [T1], "since": _iso(base)})
            await send(
                b, {"op": "subscribe", "instruments": [T1], "since": _iso(base + 2500 * 1_000_000)}
            )
            sa, sb = await asyncio.gather(_collect(a, T1, 4000), _collect(b, T1, 4000))
            await feeding
            # An offset the ring no longer holds is refused rather than guessed.
            await send(a, {"op": "subscribe", "instruments": [T1], "since": "1-0"})
            err = await _expect(a, lambda m: m["type"] == "error")
            assert err["code"] == "since_expired"
    assert sa.seqs == list(range(1, 4001))
    assert sb.seqs == list(range(2500, 4001))
    for seen in (sa, sb):
        assert len(seen.synced) == 1 and seen.dropped == 0 and not seen.errors
        assert seen.ticks[0]["offset"] is None  # from the database
        assert seen.ticks[-1]["offset"] is not None  # from the ring / live
        assert all(x["status"] == "OK" for x in seen.ticks)


# ---- slow and stalled clients -----------------------------------------------------------------


def _tiny_socket(host: str) -> socket.socket:
    """A client socket with a small receive buffer, so a client that stops reading fills the
    server's buffers quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    h, _, p = host.partition(":")
    sock.connect((h, int(p)))
    sock.setblocking(False)
    return sock


async def _watch_queues(hub: Hub, limit: int, stop: asyncio.Event) -> int:
    """Largest outbound queue seen on the server while the test runs (bounded by ``limit``)."""
    peak = 0
    while not stop.is_set():
        for c in hub.connections:
            peak = max(peak, c.live_count)
        assert peak <= limit
        await asyncio.sleep(0.005)
    return peak


async def test_slow_client_gets_dropped_and_others_are_unaffected(env: Settings) -> None:
    # A queue big enough that the measured peak (it must reach the cap for the slow client)
    # says the bound holds, not that a small queue filled by chance.
    q = 5000
    s = env.model_copy(update={"ws_queue_size": q, "ws_stall_timeout_s": 60.0})
    base = time.time_ns() - 120 * NS
    n = 40_000
    dropped_before = _metric("nadi_ws_dropped_messages_total")
    async with running_worker(s), serving(s) as (host, app):
        hub: Hub = app.state.ws_hub
        async with (
            ws_connect(host) as good,
            ws_connect(host, sock=_tiny_socket(host), max_queue=1, close_timeout=1) as slow,
        ):
            for ws in (good, slow):
                await send(ws, {"op": "subscribe", "instruments": [T1]})
                await _expect(ws, lambda m: m["type"] == "synced")
            assert _metric("nadi_ws_connections") == 2
            stop = asyncio.Event()
            watcher = asyncio.create_task(_watch_queues(hub, q, stop))
            feeding = asyncio.create_task(
                _produce_paced(s, T1, range(1, n + 1), base, chunk=1000, pause_s=0.02)
            )
            got = await _collect(
                good, T1, n, wait_s=60, synced=False
            )  # ``slow`` reads nothing meanwhile
            await feeding
            dropped = sorted(c.dropped_total for c in hub.connections)
            late = await _collect(slow, T1, n, wait_s=30, synced=False)
            stop.set()
            peak = await watcher
    assert dropped[0] == 0 and dropped[1] > 0, dropped
    # The counter the alerts read says as much as the connections do.
    assert _metric("nadi_ws_dropped_messages_total") - dropped_before == dropped[1]
    assert got.seqs == list(range(1, n + 1)) and got.dropped == 0
    # Every tick reached the slow client or was counted in a ``dropped`` message.
    assert late.dropped > 0 and len(late.ticks) + late.dropped == n
    assert late.seqs == sorted(late.seqs) and late.seqs[-1] == n
    assert peak == q


async def test_burst_larger_than_the_queue_reaches_a_client_that_keeps_up(
    env: Settings, redis_client: aioredis.Redis
) -> None:
    # One live entry (a processor batch) with 20x the queue's size of one instrument's ticks:
    # the hub lets the writers run while it dispatches, so a reading client loses nothing.
    q, n = 100, 2000
    s = env.model_copy(update={"ws_queue_size": q})
    base = time.time_ns() - 60 * NS
    ticks = [tick(T2, seq, base + seq * 1000) for seq in range(1, n + 1)]
    async with serving(s) as (host, app):
        hub: Hub = app.state.ws_hub
        async with ws_connect(host) as ws:
            await send(ws, {"op": "subscribe", "instruments": [T2]})
            await _expect(ws, lambda m: m["type"] == "synced")
            ring = RingWriter(redis_client, await redis_keys(), maxlen=10_000, ttl_s=600)
            day = ticks[0].trading_day_ordinal
            assert all(await ring.append(ticks, [day] * n, ["OK"] * n))
            got = await _collect(ws, T2, n, wait_s=30, synced=False)
            assert sum(c.dropped_total for c in hub.connections) == 0
    assert got.dropped == 0 and got.seqs == list(range(1, n + 1))


async def test_stalled_client_is_closed(env: Settings) -> None:
    # As in the test above (the stalled client's buffers fill), but a short stall timeout.
    s = env.model_copy(update={"ws_queue_size": 5000, "ws_stall_timeout_s": 1.0})
    base = time.time_ns() - 120 * NS
    stalled_before = _metric("nadi_ws_stalled_closes_total")
    async with running_worker(s), serving(s) as (host, app):
        hub: Hub = app.state.ws_hub
        async with (
            ws_connect(host) as good,
            ws_connect(host, sock=_tiny_socket(host), max_queue=1, close_timeout=1) as stalled,
        ):
            for ws in (good, stalled):
                await send(ws, {"op": "subscribe", "instruments": [T1]})
                await _expect(ws, lambda m: m["type"] == "synced")
            assert len(hub.connections) == 2
            feeding = asyncio.create_task(
                _produce_paced(s, T1, range(1, 40_001), base, chunk=1000, pause_s=0.02)
            )
            got = await _collect(good, T1, 40_000, wait_s=60, synced=False)
            await feeding
            for _ in range(100):  # the watchdog runs every 0.25 s here
                if len(hub.connections) == 1:
                    break
                await asyncio.sleep(0.1)
            assert len(hub.connections) == 1  # the stalled one was closed (4008)
            assert _metric("nadi_ws_stalled_closes_total") == stalled_before + 1
            assert _metric("nadi_ws_connections") == 1
            await send(good, {"op": "ping"})
            await _expect(good, lambda m: m["type"] == "pong")
    assert got.seqs == list(range(1, 40_001)) and got.dropped == 0


def _metric(name: str) -> float:
    """The value of one of this process's metrics (the in-process API's)."""
    value = REGISTRY.get_sample_value(name)
    assert value is not None, f"{name} is not exported"
    return value
