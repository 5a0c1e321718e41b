"""asyncpg pools for Nadi processes."""

from __future__ import annotations

import asyncpg

from nadi.settings import Settings


async def create_pool(
    settings: Settings,
    *,
    dsn: str | None = None,
    min_size: int = 1,
    max_size: int = 4,
    init: object = None,
) -> asyncpg.Pool:
    """A pool on ``dsn``, by default ``NADI_PG_DSN`` (the owner's: pass the process's own role,
    ``settings.ingest_dsn``, ``api_dsn`` or ``maint_dsn``); ``init`` runs once per new
    connection (temp tables, codecs)."""
    pool = await asyncpg.create_pool(
        dsn or settings.pg_dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        command_timeout=60,
        server_settings={"application_name": "nadi", "timezone": "UTC"},
    )
    assert pool is not None
    return pool
