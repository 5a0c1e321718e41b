"""``nadi services up|down|status``: the local PostgreSQL/TimescaleDB, Redis and Kafka."""

from __future__ import annotations

import json

import typer

from nadi.settings import get_settings

services_app = typer.Typer(
    help="The local PostgreSQL/TimescaleDB, Redis and Kafka.", no_args_is_help=True
)


def fail(msg: str) -> None:
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
    monitoring: bool = typer.Option(
        False,
        "--monitoring",
        help="also Prometheus on 127.0.0.1:NADI_PROMETHEUS_PORT, scraping the processor "
        "workers, the API and the exporter, with the alert rules of infra/monitoring",
    ),
) -> None:
    """Install what is missing and start every local service (idempotent)."""
    from infra.proc import ServiceError
    from infra.services import LocalStack

    try:
        LocalStack(get_settings()).up(timescale_edition, skip_missing_source, monitoring)
    except ServiceError as e:
        fail(str(e))


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
