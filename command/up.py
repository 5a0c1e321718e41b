"""``nadi up``: services, migrations, then every long-running part of the platform under the
supervisor (Ctrl-C stops all; the services keep running). What the demo feed does comes from
the ``demo_*`` settings. The terminal shows each process's own INFO lines and, every
``NADI_STATUS_INTERVAL_S``, a status line (:mod:`command.status`); everything, Dagster's DEBUG
events included, is in ``<log dir>/<process>.log``."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

import typer

from command.services import fail
from command.supervisor import Component
from nadi.settings import Settings, get_settings

# uvicorn's access log of the probes and of the scrapers (the status line, Prometheus): one
# line per scrape would bury everything else.
API_QUIET = (r'"GET /(?:metrics|healthz|readyz)\b[^"]*" 200',)


def platform_components(settings: Settings) -> list[Component]:
    """Beside the services: a live simulated NSE feed (with a few gaps, reorders and bad
    packets so the repair paths have work), the processor workers of one group, the API, and
    Dagster with the exporter (when its code location imports)."""
    me = (sys.executable, "-m", "command")
    s = settings
    # The simulator's retransmission server is the recovery service the repairs call.
    recovery_port = urlsplit(s.recovery_url).port or 8765
    feed = ("--rate", str(s.demo_rate), "--gap-rate", str(s.demo_gap_rate),
            "--reorder-rate", str(s.demo_reorder_rate), "--bad-rate", str(s.demo_bad_rate),
            "--recovery-port", str(recovery_port))  # fmt: skip
    components = [Component("simulate", (*me, "simulate", *feed))]
    components += [
        Component(f"process-{i + 1}", (*me, "process", "--metrics-port", str(s.metrics_port + i)))
        for i in range(s.demo_workers)
    ]
    components.append(Component("api", (*me, "api"), quiet=API_QUIET))
    try:
        from pipelines.launch import dagster_processes
    except ImportError:  # the orchestration code location is optional for `nadi up`
        return components
    return components + [
        Component(p.name, p.argv, p.env, p.quiet, stop_first=True)
        for p in dagster_processes(settings)
    ]


def up(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="also show Dagster's DEBUG events, its Beta warnings and the API's probe "
        "requests on the terminal (they are always in the log files)",
    ),
    log_dir: str | None = typer.Option(
        None, "--log-dir", help="where each process's log goes (default NADI_HOME/logs)"
    ),
    no_status: bool = typer.Option(False, "--no-status", help="no status line"),
) -> None:
    """Services up, migrate, then run the whole platform; Ctrl-C stops all."""
    import asyncio

    from command.status import run_status
    from command.supervisor import supervise
    from infra.proc import ServiceError
    from infra.services import LocalStack
    from nadi.db.migrate import run_migrations

    settings = get_settings()
    try:
        stack = LocalStack(settings)
        stack.up()
    except ServiceError as e:
        fail(str(e))
    asyncio.run(run_migrations(settings))
    # Before the loop: Dagster's home is prepared with asyncio.run.
    components = platform_components(settings)

    asyncio.run(
        supervise(
            components,
            log_dir=(Path(log_dir) if log_dir else stack.paths.logs).resolve(),
            verbose=verbose,
            status=None if no_status else lambda emit, stop: run_status(settings, emit, stop),
        )
    )
