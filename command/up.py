"""``nadi up``: services, migrations, then every long-running part of the platform under the
supervisor (Ctrl-C stops all). What the demo feed does comes from the ``demo_*`` settings."""

from __future__ import annotations

import sys

from command.services import fail
from command.supervisor import Component
from nadi.settings import Settings, get_settings


def platform_components(settings: Settings) -> list[Component]:
    """Beside the services: a live simulated NSE feed (with a few gaps, reorders and bad
    packets so the repair paths have work), the processor workers of one group, the API, and
    Dagster (when its code location imports)."""
    me = (sys.executable, "-m", "command")
    s = settings
    feed = ("--rate", str(s.demo_rate), "--gap-rate", str(s.demo_gap_rate),
            "--reorder-rate", str(s.demo_reorder_rate), "--bad-rate", str(s.demo_bad_rate))  # fmt: skip
    components = [Component("simulate", (*me, "simulate", *feed))]
    components += [
        Component(f"process-{i + 1}", (*me, "process", "--metrics-port", str(s.metrics_port + i)))
        for i in range(s.demo_workers)
    ]
    components.append(Component("api", (*me, "api")))
    try:
        from pipelines.launch import dagster_processes
    except ImportError:  # the orchestration code location is optional for `nadi up`
        return components
    return components + [Component(p.name, p.argv, p.env) for p in dagster_processes(settings)]


def up() -> None:
    """Services up, migrate, then run the whole platform; Ctrl-C stops all."""
    import asyncio

    from command.supervisor import supervise
    from infra.proc import ServiceError
    from infra.services import LocalStack
    from nadi.db.migrate import run_migrations

    settings = get_settings()
    try:
        LocalStack(settings).up()
    except ServiceError as e:
        fail(str(e))
    asyncio.run(run_migrations(settings))
    # Before the loop: Dagster's home is prepared with asyncio.run.
    components = platform_components(settings)
    asyncio.run(supervise(components))
