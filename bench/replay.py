"""``nadi bench replay``: ReplayEngine throughput and peak RSS for growing ranges.

The ticks are generated server-side (``INSERT … SELECT generate_series``: ten instruments,
interleaved 1 ms apart, so the merge never gets long runs — its worst case). Each range is
replayed in a fresh subprocess (``python -m bench.replay_child``) whose RSS is sampled alone:
flat memory means RSS at 5M ticks stays within a few MB of RSS at 1M.

The benchmark uses its own database (``nadi_bench_replay``), not the shared ``nadi_bench``, so
it can run while another benchmark recreates that one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import typer

from bench.common import PeakRss, bench_settings, emit, fresh_database
from nadi.settings import Settings, get_settings
from nadi.tick import TICK_COLUMNS

TOKENS = [100_000 + 256 * i for i in range(10)]
T0 = datetime(2025, 1, 6, 3, 45, tzinfo=UTC)  # 09:15 IST on a Monday
STEP_MS = 1  # one tick every millisecond across all instruments

_FILL_SQL = f"""
INSERT INTO ticks ({", ".join(TICK_COLUMNS)})
SELECT 100000 + (i % 10) * 256, $1::timestamptz + i * interval '1 millisecond', i / 10,
       100 + (i % 1000) * 0.05, 1 + i % 500, i, NULL, 99.95 + (i % 1000) * 0.05,
       100.05 + (i % 1000) * 0.05, 100, 120, 'OK', 'A'
FROM generate_series($2::bigint, $3::bigint - 1) i
"""


async def _fill(s: Settings, n: int) -> float:
    """``n`` ticks; four INSERTs in parallel (two cores, but WAL and index work overlap)."""
    t0 = time.perf_counter()
    parts = 4
    edges = [n * k // parts for k in range(parts + 1)]

    async def one(lo: int, hi: int) -> None:
        conn = await asyncpg.connect(s.pg_dsn)
        try:
            await conn.execute(_FILL_SQL, T0, lo, hi)
        finally:
            await conn.close()

    await asyncio.gather(*(one(a, b) for a, b in itertools.pairwise(edges)))
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        await conn.execute("VACUUM ANALYZE ticks")  # visibility map: index-only-ish reads
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def _replay_child(s: Settings, n: int, chunk_rows: int) -> dict[str, object]:
    end = T0 + timedelta(milliseconds=n * STEP_MS)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.replay_child",
        s.pg_dsn,
        T0.isoformat(),
        end.isoformat(),
        ",".join(map(str, TOKENS)),
        str(chunk_rows),
        stdout=asyncio.subprocess.PIPE,
    )
    rss = PeakRss(proc.pid, interval_s=0.02)
    rss.start()
    out, _ = await proc.communicate()
    await rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"replay child failed with exit code {proc.returncode}")
    res = json.loads(out)
    if res["ticks"] != n:
        raise RuntimeError(f"replayed {res['ticks']} ticks, expected {n}")
    return {
        "ticks": n,
        "seconds": round(res["seconds"], 3),
        "ticks_per_s": round(n / res["seconds"]),
        "peak_rss_mb": rss.peak_mb,
    }


async def run(
    settings: Settings, sizes: list[int] | None = None, chunk_rows: int = 5000
) -> dict[str, object]:
    """Fill max(sizes) ticks, then replay the first ``size`` ticks for each size."""
    sizes = sorted(sizes or [1_000_000, 5_000_000])
    s = bench_settings(settings, "replay")
    s = s.model_copy(update={"pg_dsn": s.pg_dsn.rsplit("/", 1)[0] + "/nadi_bench_replay"})
    await fresh_database(s)
    fill_s = await _fill(s, sizes[-1])
    runs = [await _replay_child(s, n, chunk_rows) for n in sizes]
    return {
        "instruments": len(TOKENS),
        "chunk_rows": chunk_rows,
        "fill_seconds": round(fill_s, 1),
        "runs": runs,
        "min_ticks_per_s": min(int(str(r["ticks_per_s"])) for r in runs),
        "rss_growth_mb": round(
            float(str(runs[-1]["peak_rss_mb"])) - float(str(runs[0]["peak_rss_mb"])), 1
        ),
    }


def bench_replay(
    sizes: str = typer.Option("1000000,5000000", help="comma list of range sizes (ticks)"),
    chunk_rows: int = typer.Option(5000, min=1, help="rows per keyset page"),
) -> None:
    """ReplayEngine ticks/s and peak RSS of the replaying process for growing ranges."""
    settings = get_settings()
    n = [int(x) for x in sizes.split(",") if x.strip()]
    emit(settings, "replay", asyncio.run(run(settings, n, chunk_rows)))
