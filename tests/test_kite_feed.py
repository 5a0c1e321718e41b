"""`nadi feed kite` against a local Kite-protocol WebSocket server (real Kafka, PostgreSQL).

The server plays frames built from the documented layout (tests/test_kite_protocol.py), sends
a heartbeat byte every 100 ms like Kite's one a second, records what clients send, and can be
killed (every TCP connection aborted, the listener closed) and started again on its port, or
go silent with the connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import msgspec
import pytest
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from nadi.db.pool import create_pool
from nadi.instruments import bundled_instruments, upsert_instruments
from nadi.settings import Settings
from nadi.tick import Tick
from streaming.feeds.kite.cli import build_config
from streaming.feeds.kite.config import KiteFeedConfig
from streaming.feeds.kite.connection import HandlerFailed
from streaming.feeds.kite.feed import KafkaTickSink, KiteFeed
from streaming.feeds.kite.protocol import Mode
from streaming.feeds.kite.state import FeedLocked, FeedState
from streaming.feeds.kite.subscriptions import split
from tests.kafka_util import read_all, wait_caught_up
from tests.processor_util import private_settings, reset_state, running_worker
from tests.test_kite_protocol import (
    _ORACLE,
    frame_of,
    full_packet,
    index_packet,
    ltp_packet,
    quote_packet,
)

NSE_A, NSE_B, CDS, INDEX = 738561, 5633, (41229 << 8) | 3, 256265


@dataclass
class ClientSeen:
    """One client connection as the server saw it."""

    ws: ServerConnection
    path: str
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> set[int]:
        return {t for m in self.messages if m.get("a") == "subscribe" for t in m["v"]}

    @property
    def ready(self) -> bool:
        """Subscribed and a mode set (what the adapter sends on every (re)connect)."""
        return bool(self.tokens) and any(m.get("a") == "mode" for m in self.messages)


class KiteServer:
    def __init__(self) -> None:
        self.port = 0
        self.clients: list[ClientSeen] = []
        self.silent = False
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1] if not self.port else self.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        seen = ClientSeen(ws, ws.request.path)
        self.clients.append(seen)
        beat = asyncio.create_task(self._beat(ws))
        try:
            async for msg in ws:
                seen.messages.append(json.loads(msg))
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()

    async def _beat(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                if not self.silent:
                    await ws.send(b"\x00")
                await asyncio.sleep(0.1)

    def ready_after(self, n: int) -> bool:
        """A client beyond the first ``n`` has subscribed."""
        return len(self.clients) > n and self.clients[-1].ready

    def live(self) -> list[ClientSeen]:
        return [c for c in self.clients if c.ws.state.name == "OPEN" and c.ready]

    async def play(self, frame: bytes | str) -> None:
        """To every live, subscribed client."""
        for c in self.live():
            await c.ws.send(frame)

    async def kill(self) -> None:
        """As if the server process died: connections aborted, nothing listening."""
        assert self._server is not None
        for c in self.clients:
            c.ws.transport.abort()
        self._server.close()
        await self._server.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def server() -> AsyncIterator[KiteServer]:
    s = KiteServer()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def env(migrated: Settings, pg: asyncpg.Connection) -> Settings:
    s = await private_settings(migrated)
    await reset_state(pg, s)
    await pg.execute("TRUNCATE feed_sequences, feed_outages")
    return s


def config_for(server: KiteServer, s: Settings, tokens: list[int], **kw: Any) -> KiteFeedConfig:
    return KiteFeedConfig(
        ws_url=server.url,
        api_key="test-key",
        access_token="test-token",
        connections=split(tokens),
        mode=Mode.FULL,
        topic=s.topic_ticks,
        heartbeat_timeout_s=kw.pop("heartbeat_timeout_s", 5.0),
        reconnect_initial_delay_s=0.05,
        reconnect_max_delay_s=0.3,
        **kw,
    )


@contextlib.asynccontextmanager
async def running_feed(s: Settings, config: KiteFeedConfig) -> AsyncIterator[KiteFeed]:
    pool = await create_pool(s, dsn=s.ingest_dsn, max_size=2)
    sink = KafkaTickSink(s.kafka_bootstrap, config.topic)
    await sink.start()
    feed = KiteFeed(config, FeedState(pool, "kite"), sink)
    task = asyncio.create_task(feed.run())
    try:
        await until(lambda: feed.ready.is_set() or task.done(), "feed start")
        yield feed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sink.stop()
        await pool.close()


def market_frame(k: int, now_s: int) -> bytes:
    """One frame with a packet of each kind the four instruments get: NSE_A full (depth),
    NSE_B quote, CDS LTP, INDEX index full. Prices move with ``k``."""
    quote_a = quote_packet(NSE_A, 250_000 + k, 5, 249_990, 1000 + k, 7, 9, 1, 2, 3, 4)
    depth = [(100 + i, 249_995 + k - i, i + 1) for i in range(5)]
    depth += [(200 + i, 250_005 + k + i, i + 1) for i in range(5)]
    return frame_of([
        full_packet(quote_a, now_s, 10 + k, 20, 5, now_s, depth),
        quote_packet(NSE_B, 61_050 + k, 1, 61_000, 50 + k, 3, 4, 1, 2, 3, 4),
        ltp_packet(CDS, 831_234_567 + k),
        index_packet(INDEX, 2_450_000 + k, 1, 1, 1, 1, 0, ts=now_s),
    ])  # fmt: skip


def oracle_prices(frames: list[bytes]) -> dict[int, list[float]]:
    """Per token, the official parser's last prices in play order."""
    out: dict[int, list[float]] = {}
    for f in frames:
        for d in _ORACLE._parse_binary(f):
            out.setdefault(d["instrument_token"], []).append(d["last_price"])
    return out


TOKENS = [NSE_A, NSE_B, CDS, INDEX]


def metric(name: str, **labels: str) -> float:
    """A sample of this process's Prometheus registry (0 before the first increment)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def produced(s: Settings) -> list[dict[str, Any]]:
    """Every message on the test's topic, decoded."""
    records = await read_all(s.kafka_bootstrap, s.topic_ticks)
    return [
        msgspec.json.decode(cast(ConsumerRecord[bytes, bytes], r).value or b"") for r in records
    ]


async def test_end_to_end_into_ticks_surviving_a_server_kill(
    env: Settings, server: KiteServer, pg: asyncpg.Connection
) -> None:
    now_s = int(time.time())
    frames = [market_frame(k, now_s) for k in range(60)]
    config = config_for(server, env, TOKENS)
    async with running_feed(env, config) as feed:
        await until(lambda: len(server.live()) == 1, "subscribe")
        (first,) = server.live()
        assert first.path == "/?api_key=test-key&access_token=test-token"
        assert first.messages == [
            {"a": "subscribe", "v": TOKENS},
            {"a": "mode", "v": ["full", TOKENS]},
        ]
        for f in frames[:20]:
            await server.play(f)
        await until(lambda: feed.stats.ticks == 80, "first 20 frames produced")
        # Killed mid-stream: of the next 20 frames, those still in buffers are lost.
        for f in frames[20:40]:
            await server.play(f)
        await server.kill()
        await until(lambda: not feed.connections[0].subscribed.is_set(), "drop noticed")
        got_before = feed.stats.frames
        assert 20 <= got_before <= 40 and feed.stats.ticks == 4 * got_before
        await asyncio.sleep(0.3)  # a few refused reconnect attempts
        await server.start()
        await until(lambda: len(server.live()) == 1, "resubscribe")
        assert server.live()[0].messages == first.messages  # the same subscription again
        for f in frames[40:]:
            await server.play(f)
        await until(lambda: feed.stats.ticks == 4 * (got_before + 20), "last 20 frames produced")
        assert feed.connections[0].reconnects == 1
        n = got_before + 20
        assert feed.stats.packets == {"full": n, "quote": n, "ltp": n, "index_full": n}
        assert feed.stats.ticks == 4 * n and not feed.stats.bad
    async with running_worker(env):
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks)
    rows = await pg.fetch(
        "SELECT instrument_token, sequence_id, last_price, last_qty, volume, oi, bid, ask, "
        "bid_qty, ask_qty, feed, status, extract(epoch FROM exchange_ts)::float8 AS ts "
        "FROM ticks ORDER BY instrument_token, sequence_id"
    )
    by_token: dict[int, list[asyncpg.Record]] = {}
    for r in rows:
        by_token.setdefault(r["instrument_token"], []).append(r)
    # What was received, numbered without a hole: the lost frames are an outage, not a gap.
    want = oracle_prices(frames[:got_before] + frames[40:])
    assert set(by_token) == set(TOKENS)
    for token, got in by_token.items():
        assert [r["sequence_id"] for r in got] == list(range(1, n + 1)), token
        assert [r["last_price"] for r in got] == want[token], token
        assert {r["feed"] for r in got} == {"kite"} and {r["status"] for r in got} == {"OK"}
    a = by_token[NSE_A][7]  # k = 7, from the full packet
    assert (a["last_qty"], a["volume"], a["oi"]) == (5, 1007, 17)
    assert (a["bid"], a["bid_qty"], a["ask"], a["ask_qty"]) == (2500.02, 100, 2500.12, 200)
    assert a["ts"] == now_s  # the exchange timestamp of a full packet
    assert by_token[CDS][0]["last_price"] == 83.1234567
    # The quote packet carries no timestamp: the receive time, within this test's run.
    assert now_s - 1 <= by_token[NSE_B][0]["ts"] <= time.time()
    assert await pg.fetchval("SELECT count(*) FROM sequence_gaps") == 0
    outages = await pg.fetch("SELECT * FROM feed_outages")
    assert len(outages) == 1
    o = outages[0]
    assert (o["feed"], o["connection"], o["reason"]) == ("kite", 0, "closed")
    assert sorted(o["instruments"]) == sorted(TOKENS) and o["ended_at"] >= o["started_at"]


async def test_watchdog_reconnects_a_silent_connection(
    env: Settings, server: KiteServer, pg: asyncpg.Connection
) -> None:
    config = config_for(server, env, [NSE_A], heartbeat_timeout_s=0.5)
    before = metric("nadi_kite_reconnects_total", reason="watchdog")
    async with running_feed(env, config) as feed:
        await until(lambda: len(server.live()) == 1, "subscribe")
        await asyncio.sleep(1.0)  # heartbeats keep it up past the timeout
        assert feed.connections[0].reconnects == 0 and feed.stats.heartbeats >= 5
        server.silent = True
        t0 = time.monotonic()
        await until(lambda: len(server.clients) == 2, "a new connection after silence")
        # Only the watchdog (0.5 s) can drop it: the silent server still answers pings.
        assert time.monotonic() - t0 < 10
        server.silent = False
        await until(lambda: feed.connections[0].reconnects == 1, "reconnect counted")
        assert server.clients[1].ready
        assert metric("nadi_kite_reconnects_total", reason="watchdog") == before + 1
    (o,) = await pg.fetch("SELECT reason, ended_at FROM feed_outages")
    assert o["reason"] == "watchdog" and o["ended_at"] is not None


async def test_bad_frames_and_text_are_counted_and_the_feed_goes_on(
    env: Settings, server: KiteServer
) -> None:
    now_s = int(time.time())
    before = metric("nadi_kite_bad_packets_total", reason="truncated")
    async with running_feed(env, config_for(server, env, TOKENS)) as feed:
        await until(lambda: len(server.live()) == 1, "subscribe")
        await server.play(b"\xff\xff\x00\x05garbage")  # "garba" (length 5), then cut
        await server.play(frame_of([b"\x01" * 13, ltp_packet(NSE_B, 100)]))
        await server.play(market_frame(0, now_s)[:-7])  # cut short
        await server.play('{"type":"error","data":"Invalid access token"}')
        await server.play('{"type":"order","data":{"order_id":"151220000000000"}}')
        await server.play("not json")
        await server.play(market_frame(1, now_s))
        await until(lambda: feed.stats.ticks == 4 + 1 + 3, "good packets produced")
        await until(lambda: sum(feed.stats.text.values()) == 3, "text frames")
        assert feed.stats.bad == {"truncated": 2, "unknown_length": 2}
        assert feed.stats.text == {"error": 1, "order": 1, "invalid": 1}
        assert metric("nadi_kite_bad_packets_total", reason="truncated") == before + 2
        assert feed.connections[0].reconnects == 0


async def test_restart_continues_the_numbers_and_records_the_restart(
    env: Settings, server: KiteServer, pg: asyncpg.Connection
) -> None:
    now_s = int(time.time())
    for run in range(2):
        async with running_feed(env, config_for(server, env, TOKENS)) as feed:
            await until(lambda: len(server.live()) == 1, "subscribe")
            for k in range(5):
                await server.play(market_frame(k, now_s))
            await until(lambda: feed.stats.ticks == 20, f"run {run} produced")
        await until(lambda: not server.live(), "client gone")
    values = await produced(env)
    seqs: dict[int, list[int]] = {}
    for v in values:
        seqs.setdefault(v["instrument_token"], []).append(v["sequence_id"])
    assert {t: sorted(s) for t, s in seqs.items()} == {t: list(range(1, 11)) for t in TOKENS}
    (o,) = await pg.fetch("SELECT reason, started_at, ended_at FROM feed_outages")
    assert o["reason"] == "adapter_restart" and o["ended_at"] >= o["started_at"]


async def test_tokens_are_split_across_connections(env: Settings, server: KiteServer) -> None:
    tokens = [(i << 8) | 1 for i in range(1, 3002)]
    async with running_feed(env, config_for(server, env, tokens)) as feed:
        await until(lambda: len(server.live()) == 2, "two connections")
        assert sorted(len(c.tokens) for c in server.live()) == [1, 3000]
        assert len(feed.connections) == 2
    with pytest.raises(ValueError, match="3 of 3000"):
        split(range(1, 9002))


def _feed_process(s: Settings, server: KiteServer, log: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NADI_PG_DSN": s.pg_dsn,
        "NADI_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "NADI_TOPIC_TICKS": s.topic_ticks,
        "NADI_KITE_WS_URL": server.url,
        "NADI_KITE_API_KEY": "test-key",
        "NADI_KITE_ACCESS_TOKEN": "test-token",
        "NADI_KITE_METRICS_PORT": "0",
    }
    tokens = ",".join(map(str, TOKENS))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "command", "feed", "kite", "--tokens", tokens, "--mode", "full"],
            env=env,
            stdout=out,
            stderr=out,
        )


async def test_kill_9_of_the_adapter_never_reuses_a_sequence(
    env: Settings, server: KiteServer, tmp_path: Any
) -> None:
    """The real command, SIGKILLed while frames stream in, then started again."""
    now_s = int(time.time())
    log = str(tmp_path / "feed.log")
    k = 0
    for _round in range(3):
        proc = _feed_process(env, server, log)
        try:
            n = len(server.clients)
            await until(lambda: server.ready_after(n), "subscribe")  # noqa: B023
            for _ in range(30):
                await server.play(market_frame(k, now_s))
                k += 1
                await asyncio.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    values = await produced(env)
    seqs: dict[int, list[int]] = {}
    for v in values:
        seqs.setdefault(v["instrument_token"], []).append(v["sequence_id"])
    assert set(seqs) == set(TOKENS), open(log).read()[-2000:]
    for token, got in seqs.items():
        assert len(got) == len(set(got)), f"{token}: a sequence was reused"
        assert got == sorted(got), f"{token}: out of order"
    # NSE_A's price says which frame a tick came from: numbers rise with the frames, across
    # the kills, and more than one run delivered.
    by_frame = sorted(
        (round(v["last_price"] * 100) - 250_000, v["sequence_id"])
        for v in values
        if v["instrument_token"] == NSE_A
    )
    assert [q for _, q in by_frame] == sorted(q for _, q in by_frame)
    assert len({k // 30 for k, _ in by_frame}) >= 2, by_frame


async def test_outages_left_open_or_met_at_start_are_closed(
    env: Settings, server: KiteServer, pg: asyncpg.Connection
) -> None:
    # A previous run died while connection 0 was down: its outage is still open.
    await pg.execute(
        "INSERT INTO feed_outages (feed, connection, instruments, started_at, reason) "
        "VALUES ('kite', 0, $1, now() - interval '1 minute', 'closed')",
        TOKENS,
    )
    await server.kill()  # and this run starts while Kite is unreachable
    async with running_feed(env, config_for(server, env, TOKENS)) as feed:
        await until(lambda: bool(feed.connections), "connections built")
        await until(lambda: feed.connections[0].failed_connects >= 2, "refused attempts")
        assert not server.clients
        await server.start()
        await until(lambda: feed.connections[0].reconnects == 1, "connected after the refusals")
    rows = await pg.fetch("SELECT reason, ended_at FROM feed_outages ORDER BY id")
    assert [r["reason"] for r in rows] == ["closed", "error"]
    assert all(r["ended_at"] is not None for r in rows)


async def test_symbols_are_resolved_through_the_instrument_master(
    env: Settings, pg: asyncpg.Connection
) -> None:
    master = bundled_instruments()[:3]
    await upsert_instruments(pg, master)
    spec = ",".join(f"{i.exchange}:{i.tradingsymbol.lower()}" for i in reversed(master))
    config = await asyncio.to_thread(
        build_config, env.model_copy(update={"kite_api_key": "k", "kite_access_token": "t"}),
        "", None, Mode.FULL, None, spec,
    )  # fmt: skip
    assert config.tokens == tuple(i.instrument_token for i in reversed(master))
    with pytest.raises(ValueError, match="NSE:NO-SUCH-SYMBOL"):
        await asyncio.to_thread(
            build_config, env.model_copy(update={"kite_api_key": "k", "kite_access_token": "t"}),
            "", None, Mode.FULL, None, "NSE:NO-SUCH-SYMBOL",
        )  # fmt: skip


async def test_a_second_adapter_on_the_same_database_is_refused(
    env: Settings, server: KiteServer
) -> None:
    async with running_feed(env, config_for(server, env, [NSE_A])):
        await until(lambda: len(server.live()) == 1, "first adapter subscribed")
        pool = await create_pool(env, dsn=env.ingest_dsn, max_size=2)
        try:
            second = KiteFeed(config_for(server, env, [NSE_B]), FeedState(pool, "kite"), NoSink())
            with pytest.raises(FeedLocked, match="another `nadi feed kite`"):
                await asyncio.wait_for(second.run(), 10)
        finally:
            await pool.close()
        assert len(server.clients) == 1  # the second never connected
    # Once the first is gone, a new run may start.
    async with running_feed(env, config_for(server, env, [NSE_A])):
        await until(lambda: len(server.live()) == 1, "next adapter subscribed")


class NoSink:
    """The second adapter must stop before producing anything."""

    async def send(self, ticks: list[Tick]) -> None:
        raise AssertionError("a refused adapter produced")


class BrokenSink:
    """Kafka down past the producer's own retries, as the feed sees it."""

    async def send(self, ticks: list[Tick]) -> None:
        raise ConnectionResetError("broker gone")


async def test_a_failing_sink_ends_the_feed_instead_of_reconnecting(
    env: Settings, server: KiteServer
) -> None:
    pool = await create_pool(env, dsn=env.ingest_dsn, max_size=2)
    try:
        feed = KiteFeed(config_for(server, env, [NSE_A]), FeedState(pool, "kite"), BrokenSink())
        task = asyncio.create_task(feed.run())
        await until(lambda: len(server.live()) == 1, "subscribe")
        await server.play(market_frame(0, int(time.time())))
        with pytest.raises(ExceptionGroup) as caught:
            await asyncio.wait_for(task, 10)
        assert caught.group_contains(HandlerFailed)
        assert len(server.clients) == 1 and feed.stats.ticks == 0
    finally:
        await pool.close()
