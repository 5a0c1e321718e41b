"""`nadi bench pipelines` (to register): how long the Dagster work takes on this machine.

One simulated NSE session day at the simulator's default density (all bundled instruments,
~450k ticks) is written with the processor's batch writer into a private database, with a few
hundred dropped ticks recorded as gaps; then, each through Dagster (in-process runs on an
ephemeral instance, so the figures include Dagster's own per-run overhead):

- ``candles_refresh_s``: a one-day candle materialization (full refresh: the day is marked
  dirty and recomputed, plus the raw-tick sample check), and ``candles_incremental_s``, the
  same day with nothing dirty (what the intraday schedule costs when idle);
- ``gap_repair_one_s``: one sensor-launched gap repair run (fetch from the recovery service
  over HTTP, insert, close, then the incremental candle refresh of that day);
- ``gap_repair_all_s``: every remaining gap of the day in one run;
- ``eod_reconciliation_s``: the day's reconciliation (bhavcopy CSV from disk, polars,
  per-instrument comparison, rows written, check).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from dagster import DagsterInstance, materialize

from bench.common import emit, fresh_database
from nadi.calendar import previous_trading_day, today_ist
from nadi.db.tick_writer import init_connection, write_batch
from nadi.instruments import bundled_instruments, upsert_instruments
from nadi.sequence import Gap
from nadi.settings import Settings, get_settings
from pipelines.assets.candles import candles
from pipelines.assets.eod import eod_reconciliation
from pipelines.assets.repair import gap_repair
from pipelines.definitions import build_definitions
from pipelines.partitions import partition_key
from pipelines.resources import resources_from_settings
from streaming.simulator.bhavcopy import write_bhavcopy
from streaming.simulator.generator import DEFAULT_DENSITY, DayGenerator
from streaming.simulator.recovery import create_recovery_app

SEED = 5
GAP_RATE = 0.001


async def _load(s: Settings, gen: DayGenerator) -> tuple[int, int]:
    rnd = random.Random(SEED)
    conn = await asyncpg.connect(s.pg_dsn)
    await init_connection(conn)
    await upsert_instruments(conn, list(gen.instruments.values()))
    n = gaps = 0
    batch: list[Any] = []
    last: dict[int, int] = {}

    async def flush() -> None:
        nonlocal batch, n, gaps
        ticks = [t for t, _ in batch]
        gs = [g for _, g in batch if g is not None]
        statuses = ["STALE" if g is not None else "OK" for _, g in batch]
        await write_batch(
            conn, ticks, [t.trading_day_ordinal for t in ticks], statuses, gs, mark_dirty=True
        )
        n += len(ticks)
        gaps += len(gs)
        batch = []

    for t in gen.stream():
        if rnd.random() < GAP_RATE:
            continue  # dropped on both feeds: only the recovery service has it
        prev = last.get(t.instrument_token, 0)
        gap = (
            Gap(t.instrument_token, t.trading_day_ordinal, prev + 1, t.sequence_id - 1)
            if t.sequence_id > prev + 1
            else None
        )
        last[t.instrument_token] = t.sequence_id
        batch.append((t, gap))
        if len(batch) >= 5000:
            await flush()
    if batch:
        await flush()
    await conn.close()
    return n, gaps


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - t, 3), out


def run(base: Settings) -> dict[str, object]:
    day: date = previous_trading_day(today_ist())
    root = base.pg_dsn.rsplit("/", 1)[0]
    port = 18765
    bhav = Path(tempfile.mkdtemp(prefix="nadi-bhav-"))
    s = base.model_copy(
        update={
            "pg_dsn": f"{root}/nadi_bench_pipelines",
            "recovery_url": f"http://127.0.0.1:{port}",
            "bhavcopy_dir": bhav,
        }
    )
    asyncio.run(fresh_database(s))
    insts = bundled_instruments(day)
    gen = DayGenerator(insts, SEED, day, density=DEFAULT_DENSITY)
    load_s, (n_ticks, n_gaps) = _timed(lambda: asyncio.run(_load(s, gen)))
    write_bhavcopy(gen, bhav)
    server = uvicorn.Server(
        uvicorn.Config(
            create_recovery_app(SEED, insts, density=DEFAULT_DENSITY),
            host="127.0.0.1", port=port, log_level="warning", lifespan="off",
        )
    )  # fmt: skip
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    res = dict(resources_from_settings(s))
    key = partition_key(day)
    out: dict[str, object] = {"trading_day": day.isoformat(), "ticks": n_ticks, "gaps": n_gaps}
    out["load_s"] = load_s
    with DagsterInstance.ephemeral() as inst:
        defs = build_definitions(s)
        # First refresh: the windows the writer marked; then a backfill-style full recompute.
        t, _ = _timed(
            lambda: materialize([candles], instance=inst, resources=res, partition_key=key)
        )
        out["candles_first_refresh_s"] = t
        t, _ = _timed(
            lambda: materialize([candles], instance=inst, resources=res, partition_key=key)
        )
        out["candles_refresh_s"] = t
        cfg = {"ops": {"candles": {"config": {"full": False}}}}
        t, _ = _timed(
            lambda: materialize(
                [candles], instance=inst, resources=res, partition_key=key, run_config=cfg
            )
        )
        out["candles_incremental_s"] = t
        ids = [r[0] for r in asyncio.run(_fetch(s, "SELECT id FROM sequence_gaps ORDER BY id"))]
        job = defs.get_job_def("gap_repair_job")
        one = {"ops": {"gap_repair": {"config": {"gap_ids": [ids[0]]}}, **cfg["ops"]}}
        t, _ = _timed(
            lambda: job.execute_in_process(run_config=one, partition_key=key, instance=inst)
        )
        out["gap_repair_one_s"] = t
        t, _ = _timed(
            lambda: materialize([gap_repair, candles], instance=inst, resources=res,
                                partition_key=key, run_config=cfg)
        )  # fmt: skip
        out["gap_repair_all_s"] = t
        left = asyncio.run(_fetch(s, "SELECT count(*) FROM sequence_gaps WHERE status = 'open'"))
        out["gaps_left_open"] = int(left[0][0])
        t, r = _timed(
            lambda: materialize([eod_reconciliation], instance=inst, resources=res,
                                partition_key=key, raise_on_error=False)
        )  # fmt: skip
        out["eod_reconciliation_s"] = t
        out["eod_passed"] = all(e.passed for e in r.get_asset_check_evaluations())
    server.should_exit = True
    th.join(5)
    return out


async def _fetch(s: Settings, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def main() -> None:
    s = get_settings()
    emit(s, "pipelines", run(s))


if __name__ == "__main__":
    main()
