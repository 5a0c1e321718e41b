"""The two TimescaleDB editions the tests run on (issue 9).

``apache`` is the cluster of NADI_PG_DSN (Debian's Apache-only build); ``timescale`` the second
cluster on NADI_PG_TSL_PORT that `nadi services up --timescale-edition` builds from
NADI_TIMESCALE_SRC. Without that source the Timescale edition is not available: its tests are
not collected, except under CI=true, where that is an error (see conftest.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg

from infra.timescale_edition import SourceMissing, require_source
from nadi.settings import Settings, on_port

APACHE = "apache"
TIMESCALE = "timescale"


def timescale_source_present(settings: Settings) -> bool:
    """True when NADI_TIMESCALE_SRC names a tarball or a TimescaleDB tree with tsl/; a path
    that exists but is neither raises (a misconfiguration, not an absence)."""
    try:
        require_source(settings.timescale_src)
    except SourceMissing:
        return False
    return True


def available_editions(settings: Settings) -> tuple[str, ...]:
    return (APACHE, TIMESCALE) if timescale_source_present(settings) else (APACHE,)


def on_edition(settings: Settings, edition: str) -> Settings:
    """``settings`` with every PostgreSQL DSN on the Apache cluster moved to ``edition``'s
    cluster (same host, user and database names; only the port changes)."""
    if edition == APACHE:
        return settings
    if edition != TIMESCALE:
        raise ValueError(f"unknown edition {edition!r}")
    moved = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        # An unset role DSN ("") follows pg_dsn by itself (Settings.ingest_dsn and the like).
        if name.startswith("pg_") and name.endswith("dsn") and isinstance(value, str) and value:
            if (urlsplit(value).port or 5432) == settings.pg_port:
                moved[name] = on_port(value, settings.pg_tsl_port)
    return settings.model_copy(update=moved)


async def fresh_database(settings: Settings, name: str | None = None) -> Settings:
    """Drop and create the database ``name`` (default: that of ``settings.pg_dsn``) on the
    cluster of ``settings.pg_dsn``; returns ``settings`` pointing at it. Raises OSError or
    asyncpg.PostgresError when the cluster is not reachable."""
    base = settings.pg_dsn.rsplit("/", 1)[0]
    name = name or settings.pg_database
    admin = await asyncpg.connect(base + "/postgres", timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return settings.model_copy(update={"pg_dsn": f"{base}/{name}"})


def edition_of(settings: Settings) -> str:
    """Which edition's cluster ``settings.pg_dsn`` points at."""
    return TIMESCALE if settings.pg_port == settings.pg_tsl_port else APACHE


# What this run can test: the Timescale edition only when its source is there.
EDITIONS = available_editions(Settings())
