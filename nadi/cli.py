"""The ``nadi`` console script (DESIGN.md section 3).

Verbs whose options live with their app (simulate, api, replay, benchmarks) are imported here
so typer can read their signatures; the work of every verb (the processor, Dagster, the
services) is imported inside the command, so a start-up stays under a second.
"""

from __future__ import annotations

import json
import sys

import typer

from api.cli import api
from bench.candles import bench_candles
from bench.faults.command import bench_faults
from bench.latency import bench_latency
from bench.replay import bench_replay
from bench.ws import bench_ws
from nadi.settings import get_settings
from nadi.supervisor import Component, supervise
from streaming.replay_cli import replay
from streaming.simulator.cli import instruments_load, simulate

app = typer.Typer(
    help="Nadi: market data for Indian equities and derivatives.", no_args_is_help=True
)
services_app = typer.Typer(
    help="The local PostgreSQL/TimescaleDB, Redis and Kafka.", no_args_is_help=True
)
app.add_typer(services_app, name="services")
bench_app = typer.Typer(
    help="Benchmarks; each prints one JSON line (also kept in .nadi/bench/).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
instruments_app = typer.Typer(help="The instrument master.", no_args_is_help=True)
app.add_typer(instruments_app, name="instruments")
app.command("simulate")(simulate)
app.command("api")(api)
app.command("replay")(replay)
bench_app.command("replay")(bench_replay)
bench_app.command("candles")(bench_candles)
bench_app.command("latency")(bench_latency)
bench_app.command("ws")(bench_ws)
bench_app.command("faults")(bench_faults)
instruments_app.command("load")(instruments_load)


def _fail(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@services_app.command("up")
def services_up(
    timescale_edition: bool = typer.Option(
        False,
        "--timescale-edition",
        help="also a second PostgreSQL with the Timescale-licensed TimescaleDB on "
        "NADI_PG_TSL_PORT, built from NADI_TIMESCALE_SRC (cached under ~/.cache/nadi)",
    ),
    skip_missing_source: bool = typer.Option(
        False,
        "--skip-missing-source",
        help="with --timescale-edition: a missing NADI_TIMESCALE_SRC is reported, not an error",
    ),
) -> None:
    """Install what is missing and start every local service (idempotent)."""
    from infra.proc import ServiceError
    from infra.services import LocalStack

    try:
        LocalStack(get_settings()).up(timescale_edition, skip_missing_source)
    except ServiceError as e:
        _fail(str(e))


@services_app.command("down")
def services_down() -> None:
    """Stop the local services; data stays under NADI_HOME."""
    from infra.services import LocalStack

    LocalStack(get_settings()).down()


@services_app.command("status")
def services_status(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """What runs where. Exit code 3 when any service is stopped."""
    from infra.services import LocalStack

    rows = LocalStack(get_settings()).status()
    if as_json:
        print(json.dumps(rows))
    else:
        for r in rows:
            state = "running" if r["running"] else "stopped"
            skip = ("service", "running", "where")
            extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in skip and v is not None)
            print(f"{r['service']:<14} {state:<8} {r['where']:<22} {extra}")
    if not all(r["running"] for r in rows):
        raise typer.Exit(3)


@app.command("migrate")
def migrate(
    with_topics: bool = typer.Option(False, help="also create the Kafka topics (for Docker)"),
) -> None:
    """Apply the dbt_or_sql/ migrations (idempotent, safe from several processes)."""
    import asyncio

    from nadi.db.migrate import run_migrations

    settings = get_settings()
    applied = asyncio.run(run_migrations(settings))
    print(json.dumps({"applied": applied}), file=sys.stderr)
    if with_topics:
        from nadi.kafka_admin import ensure_topics

        print(json.dumps({"topics": asyncio.run(ensure_topics(settings))}), file=sys.stderr)


@app.command("process")
def process(
    metrics_port: int = typer.Option(
        None, help="Prometheus port (default NADI_METRICS_PORT; 0 off)"
    ),
) -> None:
    """Run one MarketDataProcessor worker of consumer group NADI_GROUP_ID (SIGTERM drains)."""
    import asyncio

    from nadi.logs import configure
    from streaming.processor.worker import run_worker

    configure()
    settings = get_settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    asyncio.run(run_worker(settings))


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


def platform_components() -> list[Component]:
    """Every long-running part of the platform that `nadi up` starts, beside the services:
    a live simulated NSE feed (with a few gaps, reorders and bad packets so the repair paths
    have work), two processor workers of one group, the API, and Dagster."""
    me = (sys.executable, "-m", "nadi")
    components = [
        Component(
            "simulate",
            (
                *me,
                "simulate",
                "--rate",
                "1000",
                "--gap-rate",
                "0.0001",  # a gap every ~10 s: each is one repair run (a process) to watch
                "--reorder-rate",
                "0.001",
                "--bad-rate",
                "0.0002",
            ),
        ),
        Component("process-1", (*me, "process", "--metrics-port", "9108")),
        Component("process-2", (*me, "process", "--metrics-port", "9109")),
        Component("api", (*me, "api")),
    ]
    try:
        from pipelines.launch import platform_components as dagster_components
    except ImportError:  # the orchestration code location is optional for `nadi up`
        return components
    return components + dagster_components(get_settings())


@bench_app.command("pipelines")
def bench_pipelines() -> None:
    """How long a one-day candle refresh, a gap repair and an EOD reconciliation take."""
    from bench.pipelines import main as run_pipelines_bench

    run_pipelines_bench()


@app.command("up")
def up() -> None:
    """Services up, migrate, then run the whole platform; Ctrl-C stops all."""
    import asyncio

    from infra.proc import ServiceError
    from infra.services import LocalStack
    from nadi.db.migrate import run_migrations

    settings = get_settings()
    try:
        LocalStack(settings).up()
    except ServiceError as e:
        _fail(str(e))
    asyncio.run(run_migrations(settings))
    components = (
        platform_components()
    )  # before the loop: Dagster's home is prepared with asyncio.run
    asyncio.run(supervise(components))


def main() -> None:
    app()
