"""`nadi bench pipelines` (to register): how long the Dagster work takes on this machine.

One simulated NSE session day at the simulator's default density (all bundled instruments,
~450k ticks) is written with the processor's batch writer into a private database, with a few
hundred dropped ticks recorded as gaps; then, each through Dagster (in-process runs on an
ephemeral instance, so the figures include Dagster's own per-run overhead):

- ``candles_refresh_s``: a one-day candle materialization (full refresh: the day is marked
  dirty and recomputed, plus the raw-tick sample check), and ``candles_incremental_s``, the
  same day with nothing dirty (what the intraday schedule costs when idle);
- ``gap_repair``: 500 one-tick gaps across the 94 instruments repaired the way production does
  it, with the sensor and the run queue in the loop: a real ``dagster-daemon`` (sensor daemon,
  QueuedRunCoordinator, run launcher) on a dagster-postgres instance of its own. The gaps are
  held back while the day loads and put in ``sequence_gaps`` at once; ``seconds`` runs from that
  moment to all of them closed. ``one_run_per_gap_per_s`` is the previous design (one run per
  gap: ``gap_repair_batch_size=1``, no run cap) measured in the same run on a few more gaps.
  Grace is 0 (``NADI_GAP_REPAIR_GRACE_S``): these gaps are hours old, no late arrival comes.
  ``gap_repair_detail`` adds the runs, the one-run-per-gap seconds and the ratio;
- ``eod_reconciliation_s``: the day's reconciliation (bhavcopy CSV from disk, polars,
  per-instrument comparison, rows written, check).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from dagster import DagsterInstance, RunsFilter, materialize

from bench.common import emit, fresh_database
from nadi.calendar import previous_trading_day, today_ist
from nadi.db.tick_writer import init_connection, write_batch
from nadi.instruments import bundled_instruments, upsert_instruments
from nadi.sequence import Gap
from nadi.settings import Settings, get_settings
from pipelines.assets.candles import candles
from pipelines.assets.eod import eod_reconciliation
from pipelines.launch import CODE_LOCATION, ensure_dagster_home
from pipelines.partitions import partition_key
from pipelines.resources import resources_from_settings
from pipelines.sensors import ACTIVE_RUN_STATUSES
from streaming.simulator.bhavcopy import write_bhavcopy
from streaming.simulator.generator import DEFAULT_DENSITY, DayGenerator
from streaming.simulator.recovery import GeneratorRegistry, create_recovery_app

SEED = 5
GAPS = 500  # the measured batch, across all 94 bundled instruments
ONE_RUN_GAPS = 12  # the one-run-per-gap design, ~0.4 runs/s: a few are enough for the rate
CANARIES = 2  # one gap per daemon repaired first: the loop is up when it closes
DEADLINE_S = 300.0


def _drops(gen: DayGenerator, n: int) -> dict[int, set[int]]:
    """``n`` isolated sequences to drop (each a one-tick gap), every instrument at least once."""
    rnd = random.Random(SEED)
    sizes = {tok: len(gen.day_arrays(tok)) for tok in sorted(gen.instruments)}
    tokens = [t for t in sizes if sizes[t] > 10]
    out: dict[int, set[int]] = {t: set() for t in tokens}
    for i in range(n):
        tok = tokens[i] if i < len(tokens) else rnd.choice(tokens)
        while True:
            seq = rnd.randint(2, sizes[tok] - 1)
            if not out[tok] & {seq - 1, seq, seq + 1}:
                out[tok].add(seq)
                break
    return out


async def _load(s: Settings, gen: DayGenerator, drops: dict[int, set[int]]) -> tuple[int, int]:
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
        if t.sequence_id in drops.get(t.instrument_token, ()):
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
    # Held back: the measured repairs start when the rows are put back.
    await conn.execute(
        "DROP TABLE IF EXISTS bench_held_gaps;"
        " CREATE TABLE bench_held_gaps AS SELECT * FROM sequence_gaps;"
        " DELETE FROM sequence_gaps;"
    )
    await conn.close()
    return n, gaps


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - t, 3), out


class _Daemon:
    """``dagster-daemon run`` on the bench's instance, with ``env`` over the bench settings;
    its process group (daemon, code server, runs) is stopped on exit."""

    def __init__(self, home: Path, s: Settings, log: Path, **env: str) -> None:
        self.env = {
            **os.environ, "DAGSTER_HOME": str(home), "NADI_PG_DSN": s.pg_dsn,
            "NADI_RECOVERY_URL": s.recovery_url, "NADI_BHAVCOPY_DIR": str(s.bhavcopy_dir),
            "NADI_GAP_REPAIR_GRACE_S": "0", **env,
        }  # fmt: skip
        self.log = log

    def __enter__(self) -> _Daemon:
        self.out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", *CODE_LOCATION],
            env=self.env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.out.close()


async def _release(s: Settings, ids: list[int]) -> float:
    """Put held gaps back (detected now); returns the monotonic time they were committed."""
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        await conn.execute(
            "INSERT INTO sequence_gaps SELECT * FROM bench_held_gaps WHERE id = ANY($1::bigint[])",
            ids,
        )
        await conn.execute(
            "UPDATE sequence_gaps SET detected_at = now() WHERE id = ANY($1::bigint[])", ids
        )
        return time.monotonic()
    finally:
        await conn.close()


async def _wait_closed(s: Settings, ids: list[int], deadline_s: float) -> float:
    """Monotonic time when none of ``ids`` is open any more."""
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        end = time.monotonic() + deadline_s
        while True:
            left = await conn.fetchval(
                "SELECT count(*) FROM sequence_gaps WHERE id = ANY($1::bigint[])"
                " AND status = 'open'",
                ids,
            )
            now = time.monotonic()
            if left == 0:
                return now
            if now > end:
                raise RuntimeError(f"{left} of {len(ids)} gaps still open after {deadline_s} s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def _repair_through_daemon(s: Settings, home: Path, canary: int, ids: list[int],
                           **env: str) -> float:  # fmt: skip
    """Seconds from ``ids`` in sequence_gaps to all closed, under a daemon with ``env``,
    once a canary gap has gone through (the daemon and its code location are up)."""
    with _Daemon(home, s, home / "daemon.log", **env):
        asyncio.run(_release(s, [canary]))
        asyncio.run(_wait_closed(s, [canary], DEADLINE_S))
        t0 = asyncio.run(_release(s, ids))
        t1 = asyncio.run(_wait_closed(s, ids, DEADLINE_S))
        _wait_runs_done(home, DEADLINE_S)  # their candle steps, before the daemon stops
    return t1 - t0


def _wait_runs_done(home: Path, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    with DagsterInstance.from_config(str(home)) as inst:
        while inst.get_runs(RunsFilter(statuses=list(ACTIVE_RUN_STATUSES))):
            if time.monotonic() > end:
                raise RuntimeError(f"runs still active after {deadline_s} s")
            time.sleep(0.2)


def _gap_repair(s: Settings, out: dict[str, object]) -> None:
    held = [int(r[0]) for r in asyncio.run(_fetch(s, "SELECT id FROM bench_held_gaps ORDER BY id"))]
    assert len(held) == GAPS + ONE_RUN_GAPS + CANARIES, len(held)
    canary_a, canary_b = held[:CANARIES]
    one_run, batched = held[CANARIES : CANARIES + ONE_RUN_GAPS], held[CANARIES + ONE_RUN_GAPS :]
    home = Path(tempfile.mkdtemp(prefix="nadi-bench-dagster-"))
    db = f"{s.pg_database}_dagster"
    asyncio.run(_drop_database(s, db))
    ensure_dagster_home(s.model_copy(update={"dagster_home": home}), database=db)
    try:
        seconds = _repair_through_daemon(s, home, canary_a, batched)
        # The previous design: a run per gap, as many runs asked for as there are gaps.
        one_s = _repair_through_daemon(
            s, home, canary_b, one_run, NADI_GAP_REPAIR_BATCH_SIZE="1",
            NADI_GAP_REPAIR_MAX_RUNS=str(ONE_RUN_GAPS + 1),
        )  # fmt: skip
        with DagsterInstance.from_config(str(home)) as inst:
            runs = inst.get_runs(RunsFilter(job_name="gap_repair_job"))
            batch_runs = sum(1 for r in runs if r.tags.get("nadi/gaps", "1") != "1")
    finally:
        asyncio.run(_drop_database(s, db))
    closed = asyncio.run(_fetch(s, "SELECT status, count(*) FROM sequence_gaps GROUP BY 1"))
    rate = round(len(batched) / seconds, 1)
    one = round(len(one_run) / one_s, 2)
    out["gap_repair"] = {
        "gaps": len(batched), "seconds": round(seconds, 2), "gaps_per_s": rate,
        "one_run_per_gap_per_s": one,
    }  # fmt: skip
    out["gap_repair_detail"] = {
        "instruments": int(asyncio.run(_fetch(
            s, "SELECT count(DISTINCT instrument_token) FROM bench_held_gaps"))[0][0]),
        "batched_runs": batch_runs, "one_run_gaps": len(one_run),
        "one_run_seconds": round(one_s, 2), "ratio": round(rate / one, 1),
        "statuses": {str(r[0]): int(r[1]) for r in closed},
    }  # fmt: skip


async def _drop_database(s: Settings, name: str) -> None:
    conn = await asyncpg.connect(s.pg_dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(base: Settings) -> dict[str, object]:
    day: date = previous_trading_day(today_ist())
    root = base.pg_dsn.rsplit("/", 1)[0]
    port = _free_port()
    bhav = Path(tempfile.mkdtemp(prefix="nadi-bhav-"))
    s = base.model_copy(
        update={
            # Named after the caller's database: benches of two checkouts never share one.
            "pg_dsn": f"{root}/{base.pg_database}_bench_pipelines",
            "recovery_url": f"http://127.0.0.1:{port}",
            "bhavcopy_dir": bhav,
        }
    )
    asyncio.run(fresh_database(s))
    insts = bundled_instruments(day)
    gen = DayGenerator(insts, SEED, day, density=DEFAULT_DENSITY)
    drops = _drops(gen, GAPS + ONE_RUN_GAPS + CANARIES)
    load_s, (n_ticks, n_gaps) = _timed(lambda: asyncio.run(_load(s, gen, drops)))
    write_bhavcopy(gen, bhav)
    # The feed's own generator serves retransmissions, as `nadi simulate` registers its live
    # ones: what the exchange replays is exactly what was sent.
    registry = GeneratorRegistry(SEED, insts, density=DEFAULT_DENSITY)
    registry.register(gen)
    server = uvicorn.Server(
        uvicorn.Config(
            create_recovery_app(SEED, insts, density=DEFAULT_DENSITY, registry=registry),
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
    _gap_repair(s, out)
    with DagsterInstance.ephemeral() as inst:
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
