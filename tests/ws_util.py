"""Helpers for WebSocket tests: a real uvicorn server in the test's event loop (or a
subprocess), clients, stored history and a paced live feed through the processor's own
RingWriter (ring + live stream in one call, as the processor writes them, under the
database's RedisKeys)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from api.app import create_app
from nadi.redis_keys import RedisKeys
from nadi.ring import RingWriter
from nadi.settings import Settings
from tests.feedgen import tick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, FastAPI]]:
    """uvicorn serving ``create_app(settings)`` on a free port, in this event loop (so the test
    can look at the hub's connections); yields (base http URL, app)."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def ws_connect(host: str, **kw: Any) -> connect:
    kw.setdefault("compression", None)
    kw.setdefault("proxy", None)
    kw.setdefault("open_timeout", 10)
    return connect(f"ws://{host}/ws", **kw)


async def recv_messages(ws: ClientConnection, wait_s: float = 10) -> list[dict[str, Any]]:
    """One frame's messages (a frame is one JSON object or an array of them)."""
    data = json.loads(await asyncio.wait_for(ws.recv(), wait_s))
    return data if isinstance(data, list) else [data]


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


def api_env(settings: Settings) -> dict[str, str]:
    """Environment for an API subprocess reading the same services as ``settings``."""
    # Every WebSocket setting too, so the subprocess runs with the test's limits.
    ws_fields = [name for name in Settings.model_fields if name.startswith("ws_")]
    env = settings.env(
        "pg_dsn", "redis_url", "kafka_bootstrap", "allowed_origins", "max_future_skew_s",
        "api_keys", *ws_fields,
    )  # fmt: skip
    return {**env, "NADI_METRICS_PORT": "0"}


async def spawn_api(
    settings: Settings, port: int, log: str, workers: int | None = None
) -> asyncio.subprocess.Process:
    """``uvicorn api.app:create_app`` in a subprocess on ``port``, once it answers /healthz;
    with ``workers``, ``nadi api --workers N`` instead."""
    import sys

    import httpx

    fh = open(log, "ab")  # handed to the child, closed below
    if workers is None:
        argv = [
            "-m", "uvicorn", "api.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--ws-max-size", str(settings.ws_max_message_bytes), "--ws-per-message-deflate",
            "false",
        ]  # fmt: skip
    else:
        argv = ["-m", "command", "api", "--port", str(port), "--workers", str(workers)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=api_env(settings), stdout=fh, stderr=fh
    )
    fh.close()
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            if proc.returncode is not None:
                raise RuntimeError(f"the API exited with {proc.returncode}; see {log}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"the API did not start; see {log}")


# ---- history and a live feed ------------------------------------------------------------------


def iso(ts_ns: int) -> str:
    """UTC epoch ns -> ISO-8601 with offset (microseconds, as stored)."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_ns // 1000)).isoformat()


def ts_of(base_ns: int, seq: int) -> int:
    """The exchange_ts the helpers give tick ``seq``: one per millisecond after ``base_ns``."""
    return base_ns + seq * 1_000_000


async def store_history(
    pg: asyncpg.Connection, tokens: Sequence[int], seqs: range, base_ns: int
) -> None:
    """Ticks ``seqs`` of every token straight into ``ticks`` (status OK), as the processor
    would have stored them."""
    rows = []
    for tok in tokens:
        for q in seqs:
            t = tick(tok, q, ts_of(base_ns, q))
            when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t.exchange_ts // 1000)
            rows.append((tok, when, q, t.last_price, t.last_qty, t.volume, t.bid, t.ask,
                         t.bid_qty, t.ask_qty, "OK", t.feed))  # fmt: skip
    await pg.copy_records_to_table(
        "ticks",
        records=rows,
        columns=["instrument_token", "exchange_ts", "sequence_id", "last_price", "last_qty",
                 "volume", "bid", "ask", "bid_qty", "ask_qty", "status", "feed"],
    )  # fmt: skip


async def ring_append(
    r: aioredis.Redis,
    keys: RedisKeys,
    tokens: Sequence[int],
    seqs: range,
    base_ns: int,
    maxlen: int = 10_000,
) -> None:
    """Ticks ``seqs`` of every token, interleaved, into the rings and the live stream of the
    database ``keys`` belongs to."""
    ticks = [tick(tok, q, ts_of(base_ns, q)) for q in seqs for tok in tokens]
    if not ticks:
        return
    ring = RingWriter(r, keys, maxlen=maxlen, ttl_s=3600)
    day = ticks[0].trading_day_ordinal
    await ring.append(ticks, [day] * len(ticks), ["OK"] * len(ticks))


class LiveFeed:
    """``rate`` ticks/s over ``tokens`` (sequence ids from ``first``), in 10 ms batches, until
    stopped; ``last`` is the last sequence id written for every token."""

    def __init__(
        self,
        r: aioredis.Redis,
        keys: RedisKeys,
        tokens: Sequence[int],
        first: int,
        base_ns: int,
        rate: int,
    ) -> None:
        self.r, self.keys, self.tokens, self.base_ns = r, keys, list(tokens), base_ns
        self.per_slot = max(1, rate // 100 // len(self.tokens))  # per token per 10 ms
        self.next = first
        self.last = first - 1
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        t0 = time.monotonic()
        slot = 0
        while not self._stop.is_set():
            seqs = range(self.next, self.next + self.per_slot)
            await ring_append(self.r, self.keys, self.tokens, seqs, self.base_ns)
            self.next += self.per_slot
            self.last = self.next - 1
            slot += 1
            await asyncio.sleep(max(0.0, t0 + slot * 0.01 - time.monotonic()))

    def start(self) -> LiveFeed:
        self._task = asyncio.create_task(self._run(), name="test-live-feed")
        return self

    async def stop(self) -> int:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.last


class _Msg(msgspec.Struct):
    type: str
    instrument_token: int | None = None
    sequence_id: int | None = None
    offset: str | None = None
    count: int | None = None
    code: str | None = None


_decode_frame = msgspec.json.Decoder(list[_Msg] | _Msg).decode


class Received:
    """What one client got, per instrument: sequence ids (and whether each had a ring offset),
    ``synced`` messages, ``dropped`` counts and errors. Cheap enough for 1,000 clients."""

    def __init__(self) -> None:
        self.seqs: dict[int, list[int]] = {}
        self.from_db: dict[int, int] = {}  # ticks without a ring offset, per instrument
        self.synced: dict[int, int] = {}  # count per instrument
        self.synced_at: dict[int, int] = {}  # len(seqs[token]) when synced came
        self.dropped = 0
        self.errors: list[str] = []
        self.other: list[str] = []

    def add_frame(self, data: str | bytes) -> None:
        decoded = _decode_frame(data)
        for m in decoded if isinstance(decoded, list) else [decoded]:
            if m.type == "tick" and m.instrument_token is not None and m.sequence_id is not None:
                self.seqs.setdefault(m.instrument_token, []).append(m.sequence_id)
                if m.offset is None:
                    self.from_db[m.instrument_token] = self.from_db.get(m.instrument_token, 0) + 1
            elif m.type == "synced" and m.instrument_token is not None:
                self.synced[m.instrument_token] = self.synced.get(m.instrument_token, 0) + 1
                self.synced_at[m.instrument_token] = len(self.seqs.get(m.instrument_token, []))
            elif m.type == "dropped":
                self.dropped += m.count or 0
            elif m.type == "error":
                self.errors.append(f"{m.code}")
            else:
                self.other.append(m.type)

    def has(self, token: int, last_seq: int) -> bool:
        s = self.seqs.get(token)
        return s is not None and bool(s) and s[-1] >= last_seq and token in self.synced
