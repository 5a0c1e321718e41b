"""The native load clients of ``nadi bench ws`` (bench/wsload): they build, and a tiny load
against a real API subprocess counts what it should. Also: no Go toolchain fails loudly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

import infra.go
from bench import wsload
from nadi.redis_keys import RedisKeys
from nadi.ring import RingWriter
from nadi.settings import Settings
from tests.feedgen import tick
from tests.processor_util import reset_state
from tests.ws_util import free_port, spawn_api

TOKENS = [930_001 + i for i in range(5)]
RATE = 500  # ticks/s over TOKENS: 100/s per instrument
READERS, STALLED = 18, 2
PHASE_S = 3.0


def wall_ns(t: float) -> int:
    """Wall time (s) -> ns the way the Go clients convert it (whole seconds, then the rest)."""
    sec = int(t)
    return sec * 1_000_000_000 + int((t - sec) * 1e9)


async def feed(r: aioredis.Redis, keys: RedisKeys, until: float) -> list[int]:
    """RATE ticks/s into the rings and live stream (exchange_ts = now), in 10 ms slots, until
    wall time ``until``; returns every tick's exchange_ts (ns)."""
    ring = RingWriter(r, keys, maxlen=10_000, ttl_s=3600)
    per_slot = RATE // 100 // len(TOKENS)
    sent: list[int] = []
    seq = 0
    t0 = time.monotonic()
    slot = 0
    while time.time() < until:
        now = time.time_ns()
        ticks = [tick(tok, seq + k + 1, now) for k in range(per_slot) for tok in TOKENS]
        seq += per_slot
        await ring.append(ticks, [ticks[0].trading_day_ordinal] * len(ticks), ["OK"] * len(ticks))
        sent.extend(t.exchange_ts for t in ticks)
        slot += 1
        await asyncio.sleep(max(0.0, t0 + slot * 0.01 - time.monotonic()))
    return sent


async def test_native_clients_count_a_tiny_load_against_the_api(
    migrated: Settings,
    pg: asyncpg.Connection,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    await reset_state(pg, migrated)
    exe = await asyncio.to_thread(wsload.binary, tmp_path)
    assert exe.exists()
    assert wsload.binary(tmp_path) == exe  # cached: the same sources build nothing
    keys = await RedisKeys.load(pg)
    port = free_port()
    api = await spawn_api(migrated, port, str(tmp_path / "api.log"))
    try:
        now = time.time()
        p1 = (now + 4.0, now + 4.0 + PHASE_S)  # every reader subscribed by then
        p2 = (p1[1] + 0.5, p1[1] + 0.5 + PHASE_S)
        cfg = {
            "url": f"ws://127.0.0.1:{port}/ws",
            "protocol": "nadi",
            "readers": READERS,
            "stalled": STALLED,
            "tokens": TOKENS,
            "connect_at": now + 0.3,
            "open_rate": 0,
            "stalled_subscribe_at": p1[1],
            "phases": [p1, p2],
            "end_at": p2[1] + 0.5,
            "stalled_rcvbuf": 4096,
        }
        clients = asyncio.create_task(asyncio.to_thread(wsload.run, exe, "clients", cfg, 60))
        sent = await feed(redis_client, keys, p2[1] + 0.3)
        out = await clients
    finally:
        api.terminate()
        await api.wait()
    assert out["reader_failures"] == 0, out["reader_errors"]
    assert out["readers_subscribed"] == READERS
    assert out["late_subscribed"] == 0
    assert out["stalled_connected"] == STALLED
    assert out["closed_by_server"] == 0
    for (a, b), phase in zip((p1, p2), out["phases"], strict=True):
        # Each reader is on one instrument and gets every tick of it once: exactly.
        produced = sum(1 for ts in sent if wall_ns(a) <= ts < wall_ns(b))
        assert phase["delivered_by_ts"] == produced * READERS // len(TOKENS), (phase, produced)
        # By receive time: the same window shifted by the latency.
        assert abs(phase["delivered"] - phase["delivered_by_ts"]) <= 0.2 * produced * READERS / 5
        assert phase["delivered_per_s"] == round(phase["delivered"] / PHASE_S)
        assert 0 < phase["p50_ms"] <= phase["p99_ms"] <= phase["p999_ms"] <= phase["max_ms"]
        assert phase["p50_ms"] < 1000
        assert phase["frames"] > 0


def test_no_go_toolchain_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `go` here
    monkeypatch.setattr(infra.go, "GO_FALLBACKS", ())
    with pytest.raises(
        wsload.GoMissingError, match=r"needs Go .* to build its native load clients"
    ):
        wsload.binary(tmp_path)
    assert not (tmp_path / "cache" / "wsload" / wsload.source_key() / "wsload").exists()


@pytest.mark.slow
async def test_centrifugo_peer_gets_the_same_load(settings: Settings, tmp_path: Path) -> None:
    """``--peer centrifugo``'s parts: the installer (``go install``, about 3 minutes once, then
    cached), its generated config, the Go publisher and the clients in Centrifugo's protocol."""
    from infra.centrifugo import CHANNEL, Centrifugo
    from infra.paths import Paths

    exe = await asyncio.to_thread(wsload.binary, tmp_path)
    paths = Paths(home=tmp_path, cache=Paths.from_settings(settings).cache)
    server = Centrifugo(paths, free_port())
    await asyncio.to_thread(server.start)
    rate, tokens = 1000, TOKENS  # 200/s per instrument
    try:
        now = time.time()
        p1 = (now + 3.0, now + 3.0 + PHASE_S)
        p2 = (p1[1] + 0.5, p1[1] + 0.5 + PHASE_S)
        cfg = {
            "url": server.ws_url, "protocol": "centrifugo", "readers": READERS,
            "stalled": STALLED, "tokens": tokens, "channel": CHANNEL, "connect_at": now + 0.3,
            "stalled_subscribe_at": p1[1], "phases": [p1, p2], "end_at": p2[1] + 0.5,
            "stalled_rcvbuf": 4096,
        }  # fmt: skip
        pub = {
            "url": server.batch_url, "tokens": tokens, "channel": CHANNEL, "rate": rate,
            "start_at": now + 2.0, "duration_s": p2[1] + 0.2 - (now + 2.0),
        }  # fmt: skip
        clients = asyncio.create_task(asyncio.to_thread(wsload.run, exe, "clients", cfg, 60))
        published = await asyncio.to_thread(wsload.run, exe, "publish", pub, 60)
        out = await clients
    finally:
        await asyncio.to_thread(server.stop)
    assert published["errors"] == 0, published["error_samples"]
    assert out["reader_failures"] == 0, out["reader_errors"]
    assert out["readers_subscribed"] == READERS and out["late_subscribed"] == 0
    assert out["stalled_connected"] == STALLED, out["stalled_errors"]
    for phase in out["phases"]:
        # The publisher is paced on the wall clock: a phase holds rate x PHASE_S ticks (±10%),
        # and each reader gets its instrument's share of them.
        expected = rate * PHASE_S * READERS / len(tokens)
        assert abs(phase["delivered_by_ts"] - expected) <= 0.1 * expected, (phase, expected)
        assert 0 < phase["p50_ms"] <= phase["p99_ms"] < 5000
