"""Shared fixtures of the pipelines tests: a simulated market written through the real
processor, the simulator's recovery service on a free port, and a Dagster instance on
dagster-postgres in a temporary DAGSTER_HOME.

Run with ``NADI_PG_DSN=.../nadi_test_dagster NADI_REDIS_URL=redis://.../10`` (or the defaults
of conftest) like every other integration test. Under ``both_editions`` the market is built
once per edition, on that edition's cluster (Dagster's storage database too).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import asyncpg
import pytest
import uvicorn
from dagster import DagsterInstance, Definitions

from nadi.calendar import previous_trading_day, today_ist
from nadi.instruments import Instrument, bundled_equities, derivatives_for, upsert_instruments
from nadi.settings import Settings
from pipelines.definitions import build_definitions
from pipelines.launch import _dsn_for, ensure_dagster_home
from pipelines.resources import resources_from_settings
from streaming.simulator.feed import FeedSimulator
from streaming.simulator.generator import DayGenerator
from streaming.simulator.recovery import create_recovery_app
from tests.kafka_util import produce, wait_caught_up
from tests.processor_util import private_settings, reset_state, running_worker

SEED = 11
DENSITY = 0.25  # ticks per exchange-second over all instruments: ~5,600 ticks a day


def instruments_for(day: date) -> list[Instrument]:
    """Six NIFTY stocks and the NIFTY future: cash (CM) and F&O rows in the bhavcopy."""
    return bundled_equities()[:6] + derivatives_for(day)[:1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Market:
    """What the tests know about the simulated days."""

    settings: Settings  # the product's settings pointed at the test services
    days: list[date]  # oldest first; days[0] has gaps, the others are clean
    generators: dict[date, DayGenerator]
    dropped: dict[int, list[int]]  # gap day: token -> dropped sequences
    recovery_url: str
    bhavcopy_dir: Path
    instance: DagsterInstance
    defs: Definitions

    @property
    def gap_day(self) -> date:
        return self.days[0]

    def resources(self) -> dict[str, object]:
        return dict(resources_from_settings(self.settings))


class _Server:
    def __init__(self, port: int) -> None:
        app = create_recovery_app(SEED, instruments_for, density=DENSITY)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("recovery server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def _recent_days(n: int) -> list[date]:
    days: list[date] = []
    d = today_ist()
    while len(days) < n:
        d = previous_trading_day(d)
        days.append(d)
    return sorted(days)


async def _ingest(
    settings: Settings, days: list[date]
) -> tuple[dict[date, DayGenerator], dict[int, list[int]]]:
    """Every day's session through Kafka and the real MarketDataProcessor."""
    s = await private_settings(settings, partitions=4)
    # Session days are in the past: lift the ingest age limit (DESIGN.md 4) for this worker.
    s = s.model_copy(update={"max_tick_age_s": 1e10})
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await reset_state(conn, s)
        await conn.execute("TRUNCATE eod_reconciliation, instruments")
        master = {i.instrument_token: i for d in days for i in instruments_for(d)}
        await upsert_instruments(conn, list(master.values()))
    finally:
        await conn.close()
    gens: dict[date, DayGenerator] = {}
    dropped: dict[int, list[int]] = {}
    messages: list[tuple[bytes | None, bytes]] = []
    for i, d in enumerate(days):
        gen = DayGenerator(instruments_for(d), SEED, d, density=DENSITY)
        gens[d] = gen
        feed = FeedSimulator(SEED, d, dup_rate=0.2, gap_rate=0.0015 if i == 0 else 0.0)
        messages += [(m.key, m.value) for m in feed.messages(gen.stream())]
        if i == 0:
            dropped = {k: list(v) for k, v in feed.stats.dropped.items()}
    await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic_ticks, messages)
    async with running_worker(s):
        await wait_caught_up(s.kafka_bootstrap, s.group_id, s.topic_ticks)
    return gens, dropped


async def _fresh_database(settings: Settings, name: str) -> None:
    conn = await asyncpg.connect(_dsn_for(settings, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def dagster_test_db(settings: Settings) -> str:
    """The Dagster storage database of a test run, named after its test database (so runs of
    two worktrees, each with its own NADI_PG_DSN database, never share one)."""
    return f"{settings.pg_database}_dagster"


def dagster_home(settings: Settings, path: Path) -> Path:
    """A temporary DAGSTER_HOME on dagster-postgres (database :func:`dagster_test_db`)."""
    return ensure_dagster_home(
        settings.model_copy(update={"dagster_home": path}), database=dagster_test_db(settings)
    )


@pytest.fixture(scope="session")
def market(migrated: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    days = _recent_days(4)
    gens, dropped = asyncio.run(_ingest(migrated, days))
    assert sum(map(len, dropped.values())) >= 2, "the gap day must have gaps"
    asyncio.run(_fresh_database(migrated, dagster_test_db(migrated)))
    home = dagster_home(migrated, tmp_path_factory.mktemp("dagster_home"))
    bhav = tmp_path_factory.mktemp("bhavcopy")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = migrated.model_copy(
        update={"recovery_url": url, "bhavcopy_dir": bhav, "gap_repair_max_attempts": 2}
    )
    with _Server(port), DagsterInstance.from_config(str(home)) as instance:
        yield Market(
            settings, days, gens, dropped, url, bhav, instance, build_definitions(settings)
        )
