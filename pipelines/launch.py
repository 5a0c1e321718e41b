"""Running Dagster for Nadi: ``DAGSTER_HOME/dagster.yaml`` and the `nadi up` components.

Dagster's own storage (runs, event logs, schedules and sensor ticks) lives in PostgreSQL
through dagster-postgres, in a database of its own (``nadi_dagster``) on Nadi's server: runs
survive restarts, the webserver and the daemon share one view, and nothing is kept in SQLite
files under ``.nadi``. Its name follows Nadi's database (``<database>_dagster``:
``nadi_dagster`` for the default ``nadi``), so two deployments on one server, each with its own
``NADI_PG_DSN`` database, never share run storage (a daemon would launch the other's queued
runs against its own database).
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml

from nadi.settings import Settings

# The code location, by module: the same in a checkout and in an installed wheel (workspace.yaml
# names the same module for `dagster dev` in a checkout).
CODE_LOCATION = ("-m", "pipelines.definitions")
MAX_CONCURRENT_RUNS = 8
# Per-kind limits inside the global one: replays are long and heavy on Kafka; repairs (a batch
# of gaps each, at most NADI_GAP_REPAIR_MAX_RUNS asked for at once) must not crowd out candle
# refreshes.
TAG_LIMITS = (("replay", 1), ("gap_repair", 4), ("candles", 2))


def webserver_bind(settings: Settings) -> tuple[str, int]:
    """Where the Dagster webserver listens: ``NADI_DAGSTER_HOST``/``NADI_DAGSTER_PORT``
    (default 127.0.0.1:3000).

    The webserver has no authentication of its own and can launch any job (replays, repairs,
    retention). Beyond loopback it is refused unless ``NADI_DAGSTER_BEHIND_AUTH_PROXY=true``
    says a reverse proxy in front of it authenticates (README, "Dagster behind an
    authenticating proxy").
    """
    host = settings.dagster_host
    if not _is_loopback(host) and not settings.dagster_behind_auth_proxy:
        raise SystemExit(
            f"refusing to bind the Dagster webserver to {host}: it has no authentication. "
            "Keep NADI_DAGSTER_HOST on loopback, or put an authenticating reverse proxy in "
            "front of it and set NADI_DAGSTER_BEHIND_AUTH_PROXY=true"
        )
    return host, settings.dagster_port


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def _dsn_for(settings: Settings, database: str) -> str:
    u = urlsplit(settings.pg_dsn)
    return urlunsplit((u.scheme, u.netloc, "/" + database, u.query, u.fragment))


async def _create_database(settings: Settings, database: str) -> None:
    conn = await asyncpg.connect(_dsn_for(settings, "postgres"), timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{database}"')
            except asyncpg.DuplicateDatabaseError:
                pass  # created concurrently (webserver and daemon start together)
    finally:
        await conn.close()


def dagster_database(settings: Settings) -> str:
    """The run/event storage database: ``<Nadi's database>_dagster``."""
    return f"{settings.pg_database}_dagster"


def dagster_config(settings: Settings, database: str | None = None) -> dict[str, object]:
    """The content of ``dagster.yaml``."""
    database = database or dagster_database(settings)
    u = urlsplit(settings.pg_dsn)
    db: dict[str, object] = {
        "hostname": u.hostname or "127.0.0.1",
        "port": u.port or 5432,
        "username": u.username or "postgres",
        "db_name": database,
        # SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; dagster-postgres ships psycopg2.
        "scheme": "postgresql+psycopg2",
    }
    if u.password:
        db["password"] = u.password
    return {
        # One block sets run, event-log and schedule storage, all on dagster-postgres.
        "storage": {"postgres": {"postgres_db": db}},
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": MAX_CONCURRENT_RUNS,
                # A queued run starts within a second, not Dagster's default 5 (a gap repair
                # is a few seconds of work): the query is one index lookup.
                "dequeue_interval_seconds": 1,
                "tag_concurrency_limits": [
                    {"key": "nadi/kind", "value": v, "limit": n} for v, n in TAG_LIMITS
                ],
            },
        },
        "run_monitoring": {"enabled": True},
        "telemetry": {"enabled": False},
    }


def ensure_dagster_home(settings: Settings, *, database: str | None = None) -> Path:
    """Create ``settings.dagster_home`` with its ``dagster.yaml`` and the storage database.

    Idempotent; rewrites the file each time so it follows the settings (DSN changes).
    """
    database = database or dagster_database(settings)
    home = Path(settings.dagster_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    asyncio.run(_create_database(settings, database))
    text = (
        "# Written by pipelines.launch.ensure_dagster_home from Nadi's settings; edits are lost.\n"
        + yaml.safe_dump(dagster_config(settings, database), sort_keys=False)
    )
    path = home / "dagster.yaml"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    # The storage schema is created (or migrated) here, once: the webserver, the daemon and the
    # exporter starting together would otherwise race to create it ("Retrying failed database
    # creation", logged through the root logger, which then doubles every Dagster log line).
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)):
        pass
    return home


def _bin(name: str) -> str:
    # The console scripts installed next to this interpreter (the project's venv).
    return str(Path(sys.executable).parent / name)


# Lines of Dagster's processes that belong in their log files, not on the terminal (`nadi up
# --verbose` shows them): the runs' DEBUG event log (every step start, output, handled
# input...) and the warnings Dagster raises about its own beta and superseded APIs.
DAGSTER_QUIET = (
    r" - dagster(?:\.[\w.]+)? - DEBUG - ",
    r"\b(?:Beta|Preview|Supersession|Deprecation)Warning\b",
    # The daemon's narration of each sensor tick and queue pass; "Completed launch of run …"
    # and "Launched N runs" say what happened.
    r"SensorDaemon - INFO - (?:Checking for new runs|Creating new run|Launching run for"
    r"|Skipping \d+ runs? for sensor|Sensor \S+ skipped|No run requests)",
    r"QueuedRunCoordinatorDaemon - INFO - Priority sorting",
)


class Process(NamedTuple):
    """A long-running process for the command's supervisor: log name, argv, extra env, and
    patterns of its lines that go to its log file only."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    quiet: tuple[str, ...] = DAGSTER_QUIET


def dagster_processes(settings: Settings) -> list[Process]:
    """The Dagster webserver (127.0.0.1:3000 unless :func:`webserver_bind` allows otherwise),
    its daemon and the exporter (:mod:`pipelines.exporter`), for `nadi up`."""
    host, port = webserver_bind(settings)
    home = ensure_dagster_home(settings)
    env = {"DAGSTER_HOME": str(home)}
    return [
        Process(
            "dagster-web",
            (_bin("dagster-webserver"), "-h", host, "-p", str(port), *CODE_LOCATION),
            env,
        ),
        Process("dagster-daemon", (_bin("dagster-daemon"), "run", *CODE_LOCATION), env),
        # Dagster has no metrics endpoint: this serves its run counts and sensor lag (and the
        # database's gap and EOD figures) on NADI_EXPORTER_PORT.
        Process("exporter", (sys.executable, "-m", "pipelines.exporter"), env),
    ]
