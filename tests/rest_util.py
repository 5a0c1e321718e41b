"""Helpers of the serving tests: seed ticks straight into PostgreSQL, run the app in-process or
as a real `nadi api` process."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import asyncpg
import httpx

from api.app import create_app
from nadi.settings import Settings
from nadi.tick import TICK_COLUMNS
from nadi.times import to_epoch_ns


class Row(NamedTuple):
    instrument_token: int
    exchange_ts: datetime
    sequence_id: int
    last_price: float
    last_qty: int | None
    status: str = "OK"

    @property
    def ts_ns(self) -> int:
        return to_epoch_ns(self.exchange_ts)


async def seed(conn: asyncpg.Connection, rows: Iterable[Row], *, mark_dirty: bool) -> None:
    """COPY ticks in; optionally mark their 5-minute windows dirty as the writer does."""
    rows = list(rows)
    await conn.copy_records_to_table(
        "ticks",
        records=[
            (
                r.instrument_token,
                r.exchange_ts,
                r.sequence_id,
                r.last_price,
                r.last_qty,
                r.sequence_id * 10,
                None,
                r.last_price - 0.05,
                r.last_price + 0.05,
                5,
                7,
                r.status,
                "A",
            )
            for r in rows
        ],
        columns=list(TICK_COLUMNS),
    )
    if mark_dirty:
        await conn.execute(
            """INSERT INTO candle_dirty (instrument_token, bucket)
               SELECT DISTINCT t, time_bucket('5 minutes', ts)
               FROM unnest($1::bigint[], $2::timestamptz[]) AS u(t, ts)
               ON CONFLICT DO NOTHING""",
            [r.instrument_token for r in rows],
            [r.exchange_ts for r in rows],
        )


def random_rows(
    rng: random.Random,
    token: int,
    start: datetime,
    n: int,
    *,
    max_step_ms: int = 900,
    first_seq: int = 0,
    tie_rate: float = 0.2,
) -> list[Row]:
    """``n`` ticks of one instrument from ``start``; ``tie_rate`` of them share the previous
    tick's exchange_ts (a burst inside one microsecond), prices on a 0.05 grid."""
    out: list[Row] = []
    ts, price = start, 100.0 + rng.randint(0, 100)
    for i in range(n):
        if i and rng.random() >= tie_rate:
            ts += timedelta(milliseconds=rng.randint(1, max_step_ms))
        price = max(1.0, round(price + rng.choice((-0.1, -0.05, 0.0, 0.05, 0.1)), 2))
        out.append(Row(token, ts, first_seq + i, price, rng.randint(1, 50)))
    return out


@asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run (pool, Redis) and an in-process HTTP client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def api_process(
    settings: Settings, port: int, log_path: Path, *, timeout_s: float = 30
) -> AsyncIterator[str]:
    """``nadi api`` (the real command: uvicorn, the API's own database role) on ``port`` with
    the environment of ``settings``; yields its base URL once /healthz answers."""
    env = {**settings.env("pg_dsn", "redis_url", "api_keys"), "NADI_METRICS_PORT": "0"}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "command", "api", "--host", "127.0.0.1", "--port", str(port),
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as http:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"nadi api exited with {proc.returncode}; see {log_path}")
                try:
                    if (await http.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nadi api not ready in {timeout_s} s; see {log_path}")
                await asyncio.sleep(0.1)
        yield base
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
