"""``nadi bench candles``: ``GET /v1/candles`` latency (p50/p99) through a real uvicorn server.

Data: one instrument, a month of NSE sessions (09:15-15:30 IST, a tick every 500 ms, ~1M ticks)
generated server-side, marked dirty and refreshed with ``nadi_refresh_candles()`` as the
Dagster job does. Queries: 1m candles of one instrument-day (375 candles), 5m over the month
(~1650 candles), and 1m of the last day with a dirty, not-yet-refreshed last hour (the raw-tick
path). Each is timed over ``requests`` keep-alive requests from one client after a warm-up.

Uses its own database (``nadi_bench_candles``) so it can run beside other benchmarks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta

import asyncpg
import httpx
import typer

from bench.common import bench_settings, emit, fresh_database
from nadi.calendar import session_bounds, trading_days
from nadi.settings import Settings, get_settings
from nadi.tick import TICK_COLUMNS

TOKEN = 738_561
TICKS_PER_DAY = 45_000  # 6 h 15 min at 2 ticks/s

_FILL_SQL = f"""
INSERT INTO ticks ({", ".join(TICK_COLUMNS)})
SELECT $1, d + s * interval '500 milliseconds', s, 1000 + ((s * 7919) % 400) * 0.05,
       1 + s % 97, s * 50, NULL, 999.95, 1000.05, 100, 120, 'OK', 'A'
FROM unnest($2::timestamptz[]) AS d, generate_series(0, $3 - 1) AS s
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _seed(s: Settings, days: list[date]) -> dict[str, float]:
    opens = [session_bounds(d)[0].astimezone(UTC) for d in days]
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        t0 = time.perf_counter()
        await conn.execute(_FILL_SQL, TOKEN, opens, TICKS_PER_DAY)
        await conn.execute(
            "INSERT INTO candle_dirty (instrument_token, bucket)"
            " SELECT DISTINCT instrument_token, time_bucket('5 minutes', exchange_ts) FROM ticks"
        )
        fill = time.perf_counter() - t0
        t0 = time.perf_counter()
        await conn.execute("SELECT nadi_refresh_candles()")
        refresh = time.perf_counter() - t0
        # A late hour on the last day: its windows dirty again, to time the raw-tick path.
        last_hour = opens[-1] + timedelta(hours=5)
        await conn.execute(
            "INSERT INTO candle_dirty (instrument_token, bucket)"
            " SELECT $1, b FROM generate_series($2::timestamptz, $3, interval '5 minutes') b",
            TOKEN,
            last_hour,
            last_hour + timedelta(minutes=55),
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return {"fill_seconds": round(fill, 1), "refresh_seconds": round(refresh, 1)}


def _time(client: httpx.Client, params: dict[str, str | int], n: int) -> dict[str, float]:
    for _ in range(max(10, n // 10)):  # warm-up: prepared statements, plan caches
        client.get("/v1/candles", params=params).raise_for_status()
    lat: list[float] = []
    candles = 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get("/v1/candles", params=params)
        lat.append(time.perf_counter() - t0)
        r.raise_for_status()
        candles = len(r.json()["candles"])
    lat.sort()
    return {
        "candles": candles,
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2),
    }


def _serve(s: Settings, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NADI_PG_DSN": s.pg_dsn, "NADI_REDIS_URL": s.redis_url}
    env.pop("NADI_API_KEYS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env=env,
    )  # fmt: skip


def run(settings: Settings, requests: int = 200, month_days: int = 22) -> dict[str, object]:
    s = bench_settings(settings, "candles")
    s = s.model_copy(update={"pg_dsn": s.pg_dsn.rsplit("/", 1)[0] + "/nadi_bench_candles"})
    asyncio.run(fresh_database(s))
    days = trading_days(date(2025, 2, 3), date(2025, 3, 31))[:month_days]
    seeded = asyncio.run(_seed(s, days))
    port = _free_port()
    server = _serve(s, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("uvicorn did not become ready")
                time.sleep(0.1)

            def day_range(d: date) -> dict[str, str | int]:
                a, _ = session_bounds(d)
                return {
                    "start": a.isoformat(),
                    "end": (a + timedelta(hours=6, minutes=15)).isoformat(),
                }

            first = datetime.combine(days[0], datetime.min.time()).isoformat() + "+05:30"
            last = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time()).isoformat()
            queries: dict[str, dict[str, str | int]] = {
                "1m_day": {"interval": "1m", **day_range(days[len(days) // 2])},
                "5m_month": {"interval": "5m", "start": first, "end": last + "+05:30"},
                "1m_day_dirty_tail": {"interval": "1m", **day_range(days[-1])},
            }
            results = {
                name: _time(client, {"instrument_token": TOKEN, **q}, requests)
                for name, q in queries.items()
            }
    finally:
        server.terminate()
        server.wait(10)
    return {
        "ticks": TICKS_PER_DAY * len(days),
        "days": len(days),
        "requests": requests,
        **seeded,
        **results,
        "target_p99_ms_1m_day": 5.0,
    }


def bench_candles(
    requests: int = typer.Option(200, min=10, help="timed requests per query"),
    days: int = typer.Option(22, min=1, max=40, help="trading days of data"),
) -> None:
    """p50/p99 latency of GET /v1/candles (1m instrument-day, 5m month) via uvicorn."""
    settings = get_settings()
    emit(settings, "candles", run(settings, requests, days))
