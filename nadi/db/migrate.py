"""Ordered SQL migrations from ``dbt_or_sql/``, each applied once and never edited.

Files are ``NNNN_name.sql``; a file may come in license variants ``NNNN_name.apache.sql`` and
``NNNN_name.timescale.sql``, and the one matching the server's TimescaleDB license is applied.
A session-level advisory lock serialises concurrent runners, so several processes may call
this at once.

Invariants:

* ``schema_migrations`` records every applied file with the checksum of its bytes. Each run
  verifies them first: an applied file that was edited (or removed, or replaced by the other
  license's variant) stops the run with :class:`MigrationError` naming the file, before
  anything is applied. A change is always a new file with the next free number.
* A plain file runs in one transaction together with its record: all or nothing.
* A file whose first line is ``-- nadi: no-transaction`` (continuous aggregates need that) runs
  statement by statement, split by :func:`split_statements`, which understands PostgreSQL's
  lexical rules (strings, quoted identifiers, dollar quoting, nested comments). After each
  statement its index is recorded in ``schema_migration_progress``, so a run that fails half
  way resumes after the last statement that succeeded, never re-running those nor leaving
  the file unrecorded (the statements that ran may not be edited meanwhile; the rest may,
  to fix the one that failed). The statement that failed (or whose progress record was lost with the
  connection) runs again: every statement of such a file must be idempotent
  (``IF NOT EXISTS``, ``CREATE OR REPLACE``, ``if_not_exists => TRUE``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

from nadi.logs import get_logger
from nadi.settings import Settings

# Package data: the same in a checkout and in an installed wheel.
MIGRATIONS: Traversable = resources.files("dbt_or_sql")
_LOCK_KEY = 0x4E414449  # "NADI"
_NAME = re.compile(
    r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<variant>apache|timescale))?\.sql$"
)
_NO_TRANSACTION = "-- nadi: no-transaction"
log = get_logger(__name__)


class MigrationError(RuntimeError):
    """The migrations on disk and the database's record of them disagree, or SQL is malformed."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    variant: str | None
    path: Traversable

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        """First 16 hex digits of the SHA-256 of the file's bytes (as recorded since 0001)."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(_NO_TRANSACTION)

    @property
    def statements(self) -> list[str]:
        try:
            return split_statements(self.sql)
        except ValueError as e:
            raise MigrationError(f"{self.path.name}: {e}") from None


def discover(directory: Traversable | Path = MIGRATIONS) -> list[Migration]:
    found = []
    sql = (p for p in directory.iterdir() if p.name.endswith(".sql"))
    for p in sorted(sql, key=lambda p: p.name):
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


# -- the statement splitter ---------------------------------------------------------------------

# A dollar-quote opener: $$ or $tag$ (tag: an identifier without '$'; "$1" is a parameter).
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\u0080-\uffff]")


def split_statements(sql: str) -> list[str]:
    """The statements of ``sql``, each stripped and without its terminating ``;``.

    Follows PostgreSQL's lexer where a ``;`` can hide: ``'...'`` strings (``''`` inside),
    ``E'...'`` strings (backslash escapes too), ``"..."`` identifiers, ``$$...$$`` and
    ``$tag$...$tag$`` bodies, ``--`` line comments and ``/* */`` comments, which nest.
    Parts holding only comments and blanks are dropped. Raises ValueError on an unterminated
    string, identifier, dollar quote or comment, giving the line where it opened.
    """
    out: list[str] = []
    start = 0  # where the current statement began
    has_code = False  # the current statement has something besides comments and blanks
    i, n = 0, len(sql)

    def line_of(pos: int) -> int:
        return sql.count("\n", 0, pos) + 1

    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while depth:
                k_open, k_close = sql.find("/*", j), sql.find("*/", j)
                if k_close < 0:
                    raise ValueError(f"unterminated /* comment opened on line {line_of(i)}")
                if 0 <= k_open < k_close:
                    depth, j = depth + 1, k_open + 2
                else:
                    depth, j = depth - 1, k_close + 2
            i = j
            continue
        if c == ";":
            if has_code:
                out.append(sql[start:i].strip())
            start, has_code, i = i + 1, False, i + 1
            continue
        if c.isspace():
            i += 1
            continue
        has_code = True
        if c == "'" or (
            c in "eE"
            and sql.startswith("'", i + 1)
            and (i == 0 or not _IDENT_CHAR.match(sql[i - 1]))
        ):
            escapes = c != "'"
            j = i + (2 if escapes else 1)
            while True:
                if j >= n:
                    raise ValueError(f"unterminated string opened on line {line_of(i)}")
                if escapes and sql[j] == "\\":
                    j += 2
                elif sql[j] == "'":
                    if sql.startswith("'", j + 1):  # '' is a quote inside the string
                        j += 2
                    else:
                        break
                else:
                    j += 1
            i = j + 1
        elif c == '"':
            j = i + 1
            while True:
                k = sql.find('"', j)
                if k < 0:
                    raise ValueError(f"unterminated quoted identifier on line {line_of(i)}")
                if sql.startswith('"', k + 1):
                    j = k + 2
                else:
                    break
            i = k + 1
        elif c == "$" and (i == 0 or not _IDENT_CHAR.match(sql[i - 1])):
            m = _DOLLAR_TAG.match(sql, i)
            if m is None:  # a parameter such as $1
                i += 1
                continue
            end = sql.find(m.group(), m.end())
            if end < 0:
                raise ValueError(
                    f"unterminated dollar-quoted string {m.group()} opened on line {line_of(i)}"
                )
            i = end + len(m.group())
        else:
            i += 1
    if has_code:
        out.append(sql[start:].strip())
    return out


# -- applying -----------------------------------------------------------------------------------

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY, name text NOT NULL, variant text,
    checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
-- A no-transaction file being applied: statements [0, statements_done) have succeeded;
-- checksum covers those statements' text.
CREATE TABLE IF NOT EXISTS schema_migration_progress (
    version text PRIMARY KEY, file text NOT NULL, checksum text NOT NULL,
    statements_done integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
"""


async def run_migrations(
    settings: Settings, directory: Traversable | Path = MIGRATIONS
) -> list[str]:
    """Apply what is missing; returns the versions applied by this call (empty: a no-op).

    Raises :class:`MigrationError` when an applied file was edited or is missing.
    """
    conn = await asyncpg.connect(settings.pg_dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(_BOOKKEEPING)
        migrations = discover(directory)
        done = await _verify_applied(conn, migrations)
        license_ = "apache"
        for m in migrations:
            if m.version == "0001" and m.version not in done:
                # The extension must exist before its license can be read.
                await _apply(conn, m)
                done.add(m.version)
                applied.append(m.version)
        license_ = await timescaledb_license(conn)
        chosen = plan(migrations, license_)
        for m in chosen:
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


async def _verify_applied(conn: asyncpg.Connection, migrations: list[Migration]) -> set[str]:
    """The applied versions, after checking each against the file it was applied from."""
    files = {(m.version, m.variant): m for m in migrations}
    done: set[str] = set()
    for r in await conn.fetch(
        "SELECT version, name, variant, checksum FROM schema_migrations ORDER BY version"
    ):
        suffix = f".{r['variant']}" if r["variant"] else ""
        filename = f"{r['version']}_{r['name']}{suffix}.sql"
        m = files.get((r["version"], r["variant"]))
        if m is None or m.name != r["name"]:
            raise MigrationError(
                f"migration {filename} is recorded as applied but is not in dbt_or_sql/"
                " any more (the database is newer than this code, or a file was renamed)"
            )
        if m.checksum != r["checksum"]:
            raise MigrationError(
                f"migration {m.path.name} was edited after it was applied (checksum recorded "
                f"{r['checksum']}, file now {m.checksum}): applied migrations are never edited; "
                "restore the file and put the change in a new migration"
            )
        done.add(r["version"])
    return done


def _done_checksum(statements: list[str], done: int) -> str:
    """Checksum of the first ``done`` statements of a no-transaction file."""
    return hashlib.sha256("\0".join(statements[:done]).encode()).hexdigest()[:16]


_RECORD = "INSERT INTO schema_migrations (version, name, variant, checksum) VALUES ($1, $2, $3, $4)"


async def _apply(conn: asyncpg.Connection, m: Migration) -> None:
    if m.transactional:
        try:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(_RECORD, m.version, m.name, m.variant, m.checksum)
        except asyncpg.PostgresError as e:
            raise MigrationError(f"migration {m.path.name} failed (rolled back): {e}") from e
        return
    statements = m.statements
    progress = await conn.fetchrow(
        "SELECT file, checksum, statements_done FROM schema_migration_progress WHERE version = $1",
        m.version,
    )
    first = 0
    if progress is not None:
        first = int(progress["statements_done"])
        # The statements that ran must be the ones on disk; what follows may have been fixed.
        if (progress["file"], progress["checksum"]) != (
            m.path.name,
            _done_checksum(statements, first),
        ):
            raise MigrationError(
                f"migration {m.path.name} is partly applied ({first} statements of "
                f"{progress['file']} ran) and those statements were edited since; restore them "
                "(only statements that have not run yet may change)"
            )
        log.info("migration resumed", file=m.path.name, after_statement=first)
    for k in range(first, len(statements)):
        try:
            await conn.execute(statements[k])
        except asyncpg.PostgresError as e:
            raise MigrationError(
                f"migration {m.path.name}, statement {k + 1} of {len(statements)} failed: {e}"
                f" ({k} done; the next run resumes at statement {k + 1})\n{statements[k][:500]}"
            ) from e
        await conn.execute(
            """INSERT INTO schema_migration_progress (version, file, checksum, statements_done)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (version) DO UPDATE
               SET file = excluded.file, checksum = excluded.checksum,
                   statements_done = excluded.statements_done, updated_at = now()""",
            m.version,
            m.path.name,
            _done_checksum(statements, k + 1),
            k + 1,
        )
    async with conn.transaction():
        await conn.execute(_RECORD, m.version, m.name, m.variant, m.checksum)
        await conn.execute("DELETE FROM schema_migration_progress WHERE version = $1", m.version)
