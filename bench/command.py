"""``nadi bench ...``: each benchmark prints one JSON line (also kept in .nadi/bench/).

Mounted by command/bench.py when the command runs from a checkout (bench/ is not in the wheel).
Options are read from each benchmark's signature; its work is imported inside the command.
"""

from __future__ import annotations

import typer

from bench.candles import bench_candles
from bench.faults.command import bench_faults
from bench.latency import bench_latency
from bench.replay import bench_replay
from bench.ws import bench_ws
from nadi.settings import get_settings

bench_app = typer.Typer(
    help="Benchmarks; each prints one JSON line (also kept in .nadi/bench/).", no_args_is_help=True
)
bench_app.command("replay")(bench_replay)
bench_app.command("candles")(bench_candles)
bench_app.command("latency")(bench_latency)
bench_app.command("ws")(bench_ws)
bench_app.command("faults")(bench_faults)


@bench_app.command("ingest")
def bench_ingest(
    n: int = typer.Option(1_000_000, help="messages in the topic, redundant duplicates included"),
    dup_rate: float = typer.Option(
        0.05, min=0.0, max=1.0, help="share of ticks sent on both feeds"
    ),
    batch: int = typer.Option(5000, min=100, help="records per processor batch"),
) -> None:
    """Sustained ticks/s of one worker, next to a raw idempotent COPY in the same run."""
    import asyncio

    from bench.common import emit
    from bench.ingest import run

    settings = get_settings()
    emit(settings, "ingest", asyncio.run(run(settings, n, dup_rate, batch)))


@bench_app.command("import")
def bench_import(
    rows: int = typer.Option(5_000_000, min=10_000, help="rows of the big generated CSV"),
    small: int = typer.Option(1_000_000, min=10_000, help="rows of the small one (RSS flatness)"),
    chunk_rows: int = typer.Option(250_000, min=1000, help="rows per import chunk"),
    keep: bool = typer.Option(False, help="keep the benchmark database afterwards"),
) -> None:
    """`nadi import` of a generated CSV: rows/s, ratio to raw COPY, peak RSS, a second import."""
    import asyncio

    from bench.common import emit
    from bench.import_ import run

    settings = get_settings()
    emit(settings, "import", asyncio.run(run(settings, rows, small, chunk_rows, keep)))


@bench_app.command("pipelines")
def bench_pipelines() -> None:
    """How long a one-day candle refresh, a gap repair and an EOD reconciliation take."""
    from bench.pipelines import main as run_pipelines_bench

    run_pipelines_bench()
