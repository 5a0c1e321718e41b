"""The live page at / in headless Chromium against a running stack: a real processor, the API
in a uvicorn subprocess, ticks flowing through Kafka. Chromium (Debian package) and
playwright-core are installed by tests/browser/setup.sh when missing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest
from confluent_kafka import Producer

from nadi.settings import Settings
from tests.feedgen import msg, tick
from tests.processor_util import private_settings, reset_state, running_worker
from tests.ws_util import free_port, spawn_api

BROWSER_DIR = Path(__file__).parent / "browser"
TOKEN = 738561


def _setup_browser() -> None:
    r = subprocess.run(
        ["bash", str(BROWSER_DIR / "setup.sh")], capture_output=True, text=True, timeout=900
    )
    if r.returncode != 0:
        pytest.fail(f"browser setup failed:\n{r.stdout}\n{r.stderr}")


async def _feed(s: Settings, stop: asyncio.Event) -> int:
    """Live ticks of TOKEN (exchange_ts = now), 3 every 50 ms until ``stop``; every 50th
    sequence is skipped, so the next tick is STALE and gaps are open."""

    def run() -> int:
        p = Producer({"bootstrap.servers": s.kafka_bootstrap, "linger.ms": 1})
        seq, price = 0, 2500.0
        while not stop.is_set():
            for _ in range(3):
                seq += 1
                price = round(price + (0.05 if seq % 7 < 4 else -0.05), 2)
                if seq % 50:
                    key, value = msg(tick(TOKEN, seq, time.time_ns(), price))
                    p.produce(s.topic_ticks, value, key)
            p.poll(0)
            time.sleep(0.05)
        p.flush(10)
        return seq

    return await asyncio.to_thread(run)


async def test_live_page_shows_ticks_and_candles(
    migrated: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    await asyncio.to_thread(_setup_browser)
    s = await private_settings(migrated)
    await reset_state(pg, s)
    await pg.execute(
        "INSERT INTO instruments (instrument_token, exchange_token, tradingsymbol, name, segment,"
        " instrument_type, exchange) VALUES ($1, 2885, 'RELIANCE', 'RELIANCE INDUSTRIES', 'NSE',"
        " 'EQ', 'NSE') ON CONFLICT DO NOTHING",
        TOKEN,
    )
    port = free_port()
    s = s.model_copy(update={"allowed_origins": f"http://127.0.0.1:{port}"})
    shot = tmp_path / "live_page.png"
    stop = asyncio.Event()
    async with running_worker(s):
        api = await spawn_api(s, port, str(tmp_path / "api.log"))
        feeding = asyncio.create_task(_feed(s, stop))
        try:
            node = await asyncio.create_subprocess_exec(
                "node", str(BROWSER_DIR / "live_page.mjs"), f"http://127.0.0.1:{port}/",
                str(TOKEN), str(shot), stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(node.communicate(), 120)
        finally:
            stop.set()
            await feeding
            api.terminate()
            await api.wait()
    result = json.loads(out.decode().strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    assert not result["errors"], result["errors"]
    assert result["connected"] and result["ticks"] >= 20 and result["rows"] >= 20
    assert result["candles"] >= 1 and result["colouredPixels"] > 50
    assert result["staleRows"] >= 1 and result["staleBackground"] not in ("", "rgba(0, 0, 0, 0)")
    assert shot.stat().st_size > 10_000
