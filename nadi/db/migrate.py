"""Ordered SQL migrations from ``dbt_or_sql/``, each applied once.

Files are ``NNNN_name.sql``; a file may come in license variants ``NNNN_name.apache.sql`` and
``NNNN_name.timescale.sql``, and the one matching the server's TimescaleDB license is applied.
A session-level advisory lock serialises concurrent runners, so several processes may call
this at once. A file whose first line is ``-- nadi: no-transaction`` runs statement by
statement outside a transaction (continuous aggregates need that).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from nadi.logs import get_logger
from nadi.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "dbt_or_sql"
_LOCK_KEY = 0x4E414449  # "NADI"
_NAME = re.compile(
    r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<variant>apache|timescale))?\.sql$"
)
log = get_logger(__name__)


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    variant: str | None
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith("-- nadi: no-transaction")


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for p in sorted(directory.glob("*.sql")):
        m = _NAME.match(p.name)
        if not m:
            raise ValueError(
                f"migration file {p.name} is not named NNNN_name[.apache|.timescale].sql"
            )
        found.append(Migration(m["version"], m["name"], m["variant"], p))
    return found


def plan(migrations: list[Migration], license_: str) -> list[Migration]:
    """One migration per version: the variant for this license, else the plain file."""
    variant = "apache" if license_ == "apache" else "timescale"
    by_version: dict[str, list[Migration]] = {}
    for m in migrations:
        by_version.setdefault(m.version, []).append(m)
    chosen = []
    for version in sorted(by_version):
        group = by_version[version]
        plain = [m for m in group if m.variant is None]
        matching = [m for m in group if m.variant == variant]
        if len(plain) + len(matching) != 1:
            raise ValueError(
                f"migration {version} must have exactly one file for license {license_}"
            )
        chosen.append((plain or matching)[0])
    return chosen


async def timescaledb_license(conn: asyncpg.Connection) -> str:
    """``apache`` or ``timescale`` (the community license, which allows continuous aggregates)."""
    value = await conn.fetchval("SELECT current_setting('timescaledb.license', true)")
    return str(value or "apache")


def _statements(sql: str) -> list[str]:
    # Only for no-transaction files, which hold plain statements without dollar-quoted bodies.
    return [
        s.strip() for s in re.split(r";\s*(?:\n|$)", sql) if s.strip() and not _only_comments(s)
    ]


def _only_comments(s: str) -> bool:
    return all(not ln.strip() or ln.strip().startswith("--") for ln in s.splitlines())


async def run_migrations(settings: Settings, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply what is missing; returns the versions applied by this call (empty: a no-op)."""
    conn = await asyncpg.connect(settings.pg_dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY, name text NOT NULL, variant text,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        migrations = discover(directory)
        license_ = "apache"
        for m in migrations:
            if m.version == "0001" and m.version not in done:
                # The extension must exist before its license can be read.
                await _apply(conn, m)
                done.add(m.version)
                applied.append(m.version)
        license_ = await timescaledb_license(conn)
        for m in plan(migrations, license_):
            if m.version in done:
                continue
            await _apply(conn, m)
            applied.append(m.version)
        if applied:
            log.info("migrations applied", versions=applied, license=license_)
        return applied
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        finally:
            await conn.close()


async def _apply(conn: asyncpg.Connection, m: Migration) -> None:
    record = (
        "INSERT INTO schema_migrations (version, name, variant, checksum) VALUES ($1, $2, $3, $4)"
    )
    if m.transactional:
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(record, m.version, m.name, m.variant, m.checksum)
    else:
        for stmt in _statements(m.sql):
            await conn.execute(stmt)
        await conn.execute(record, m.version, m.name, m.variant, m.checksum)
