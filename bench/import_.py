"""``nadi bench import``: a generated history CSV through ``nadi import`` (a child process, so
its peak RSS is its own), next to a raw idempotent COPY of the same rows in the same run.

Files: ``small`` rows (default 1M) and ``rows`` rows (default 5M), disjoint instruments, two
trading days, naive IST timestamps and no sequence_id column (the importer assigns them).
Figures: rows/s and peak RSS of each import, a second import of the big file (must store
nothing new), and raw COPY: the big file's rows already parsed and rendered as the stage's CSV,
COPYed in the same chunks into a session stage and INSERT ... ON CONFLICT DO NOTHING into an
empty hypertable shaped like ``ticks`` (as ``bench ingest`` measures its raw baseline), in one
transaction, once right before and once right after the big import (the ratio uses their mean). ``ratio_to_raw`` compares the write phases; candle refresh is reported apart.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import polars as pl

from bench.common import RAW_BENCH_TABLE, bench_settings, fresh_database
from nadi.importer.frame import SequenceAssigner, encode_csv, normalize, read_chunks
from nadi.importer.mapping import ColumnMapping
from nadi.importer.run import default_source
from nadi.settings import Settings
from nadi.times import IST_OFFSET_S, US

DAYS = (date(2024, 1, 15), date(2024, 1, 16))
SESSION_S = 22_500  # 09:15-15:30 IST


def generate_csv(path: Path, rows: int, token0: int, instruments: int = 250, seed: int = 7) -> None:
    """``rows`` ticks of ``instruments`` instruments over DAYS, in time order, naive IST."""
    rng = np.random.default_rng(seed)
    per_day = rows // len(DAYS)
    parts = []
    for i, d in enumerate(DAYS):
        n = per_day if i < len(DAYS) - 1 else rows - per_day * (len(DAYS) - 1)
        open_us = ((d - date(1970, 1, 1)).days * 86_400 + 9 * 3600 + 15 * 60 - IST_OFFSET_S) * US
        ts = np.sort(rng.integers(0, SESSION_S * US, n)) + open_us
        tok = rng.integers(0, instruments, n) + token0
        price = np.round(1000 + rng.standard_normal(n).cumsum() * 0.05 + tok % 100, 2)
        qty = rng.integers(1, 500, n)
        spread = np.round(rng.integers(1, 10, n) * 0.05, 2)
        parts.append(
            pl.DataFrame(
                {
                    "instrument_token": tok,
                    # naive wall-clock IST, as most vendors' files are
                    "exchange_ts": pl.Series(ts + IST_OFFSET_S * US).cast(pl.Datetime("us")),
                    "last_price": price,
                    "last_qty": qty,
                    "volume": qty.cumsum(),
                    "bid": np.round(price - spread, 2),
                    "ask": np.round(price + spread, 2),
                    "bid_qty": rng.integers(1, 5000, n),
                    "ask_qty": rng.integers(1, 5000, n),
                }
            )
        )
    pl.concat(parts).write_csv(path, datetime_format="%Y-%m-%d %H:%M:%S%.6f")


def _peak_rss_import(s: Settings, path: Path, chunk_rows: int) -> dict[str, Any]:
    """``nadi import path`` in a child: its result line, wall seconds and its own peak RSS
    (from wait4, so other children of this process do not count)."""
    env = {**os.environ, "NADI_PG_DSN": s.pg_dsn, "NADI_PG_MAINT_DSN": s.maint_dsn}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "command", "import", str(path), "--chunk-rows", str(chunk_rows)],
            env=env,
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise RuntimeError(
                f"nadi import failed ({p.returncode}): {err.read().decode()[-2000:]}"
            )
        r: dict[str, Any] = json.loads(out.read().decode().strip().splitlines()[-1])
    r["wall_seconds"] = round(wall, 2)
    r["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux: kilobytes
    # the importer's own CPU (parse, checks, encode): on a 2-core machine it competes with the
    # database backend, which the raw COPY baseline (rows rendered beforehand) does not
    r["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    return r


def render_stage(path: Path, out: Path, chunk_rows: int) -> int:
    """The file's rows as the importer stages them (typed, sequenced), as stage CSV."""
    m = ColumnMapping()
    _, it = read_chunks(path, m, chunk_rows)
    seq = SequenceAssigner()
    n = 0
    with out.open("wb") as fh:
        for df in it:
            c = normalize(df, m, source=default_source(path))
            fh.write(encode_csv(seq.assign(c.frame)))
            n += c.frame.height
    return n


async def raw_copy(s: Settings, stage_csv: Path, chunk_rows: int) -> tuple[float, int]:
    """Seconds to COPY the rendered rows in chunks into a stage and INSERT ... ON CONFLICT DO
    NOTHING into an empty ticks-shaped hypertable, in one transaction; and rows stored."""
    conn = await asyncpg.connect(s.pg_dsn, command_timeout=None)
    try:
        await conn.execute(RAW_BENCH_TABLE)
        await conn.execute(
            """CREATE TEMP TABLE raw_stage (
                   instrument_token bigint, ts_us bigint, sequence_id bigint, last_price float8,
                   last_qty bigint, volume bigint, oi bigint, bid float8, ask float8,
                   bid_qty bigint, ask_qty bigint, status text, feed text, trading_day date
               ) ON COMMIT DELETE ROWS;"""
        )
        t0 = time.perf_counter()
        async with conn.transaction():
            with stage_csv.open("rb") as fh:
                while True:
                    lines = [ln for _, ln in zip(range(chunk_rows), fh, strict=False)]
                    if not lines:
                        break
                    await conn.copy_to_table(
                        "raw_stage", source=io.BytesIO(b"".join(lines)), format="csv"
                    )
                    await conn.execute(
                        """INSERT INTO ticks_raw_bench (instrument_token, exchange_ts, sequence_id,
                               last_price, last_qty, volume, oi, bid, ask, bid_qty, ask_qty,
                               status, feed)
                           SELECT instrument_token,
                                  'epoch'::timestamptz + ts_us * INTERVAL '1 microsecond',
                                  sequence_id, last_price, last_qty, volume, oi, bid, ask,
                                  bid_qty, ask_qty, status, feed
                           FROM raw_stage ON CONFLICT DO NOTHING"""
                    )
                    await conn.execute("TRUNCATE raw_stage")
        seconds = time.perf_counter() - t0
        stored = int(await conn.fetchval("SELECT count(*) FROM ticks_raw_bench"))
        await conn.execute("DROP TABLE ticks_raw_bench")
        return seconds, stored
    finally:
        await conn.close()


async def _drop(s: Settings) -> None:
    admin = await asyncpg.connect(s.pg_dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{s.pg_database}" WITH (FORCE)')
    finally:
        await admin.close()


async def run(base: Settings, rows: int, small: int, chunk_rows: int, keep: bool) -> dict[str, Any]:
    s = bench_settings(base, "import")
    await fresh_database(s)
    with tempfile.TemporaryDirectory(prefix="nadi-bench-import-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        small_csv, big_csv = d / "small.csv", d / "big.csv"
        generate_csv(small_csv, small, token0=1_000_000)
        generate_csv(big_csv, rows, token0=2_000_000)
        gen_s = time.perf_counter() - t0
        stage_csv = d / "stage.csv"
        staged = render_stage(big_csv, stage_csv, chunk_rows)
        first_small = _peak_rss_import(s, small_csv, chunk_rows)
        # The machine is shared: raw COPY right before and right after the import, so both
        # sides see about the same load; the ratio is against their mean.
        load = [os.getloadavg()[0]]
        raw_before, raw_stored = await raw_copy(s, stage_csv, chunk_rows)
        first = _peak_rss_import(s, big_csv, chunk_rows)
        raw_after, _ = await raw_copy(s, stage_csv, chunk_rows)
        load.append(os.getloadavg()[0])
        raw_s = (raw_before + raw_after) / 2
        second = _peak_rss_import(s, big_csv, chunk_rows)
        conn = await asyncpg.connect(s.pg_dsn)
        try:
            stored = int(await conn.fetchval("SELECT count(*) FROM ticks"))
        finally:
            await conn.close()
        big_bytes = big_csv.stat().st_size
    if not keep:
        await _drop(s)
    write_s = float(first["write_seconds"])
    return {
        "rows": rows,
        "file_mb": round(big_bytes / 2**20, 1),
        "chunk_rows": chunk_rows,
        "generate_seconds": round(gen_s, 1),
        "import_rows_per_s": round(rows / write_s),
        "import_write_seconds": write_s,
        "import_candle_seconds": first["candle_seconds"],
        "import_wall_seconds": first["wall_seconds"],
        "import_inserted": first["inserted"],
        "import_client_cpu_seconds": first["cpu_seconds"],
        "raw_copy_seconds": round(raw_s, 2),
        "raw_copy_seconds_before_after": [round(raw_before, 2), round(raw_after, 2)],
        "load_avg_1m_before_after": [round(x, 1) for x in load],
        "raw_copy_rows_per_s": round(staged / raw_s),
        "raw_copy_stored": raw_stored,
        "ratio_to_raw": round(raw_s / write_s, 3),
        "ratio_to_raw_with_candles": round(raw_s / (write_s + float(first["candle_seconds"])), 3),
        "peak_rss_mb": {f"{small}": first_small["peak_rss_mb"], f"{rows}": first["peak_rss_mb"]},
        "small_rows_per_s": round(small / float(first_small["write_seconds"])),
        "second_import": {
            "inserted": second["inserted"],
            "already_stored": second["already_stored"],
            "write_seconds": second["write_seconds"],
        },
        "ticks_stored": stored,
        "stored_as_expected": stored == rows + small and second["inserted"] == 0,
    }
