"""The FastAPI application: REST under /v1, the WebSocket hub at /ws, the live page at /.

``create_app`` wires the parts; the ``lifespan`` owns the asyncpg pool and the Redis client
(and starts/stops each part's background work through its ``startup``/``shutdown`` hooks).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api import rest, ws
from nadi.db.pool import create_pool
from nadi.redis_keys import RedisKeys
from nadi.settings import Settings, get_settings

GC_GEN0_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The API's own read-only role (NADI_PG_API_DSN; dbt_or_sql/0013_roles.sql).
        app.state.pool = await create_pool(settings, dsn=settings.api_dsn, min_size=2, max_size=10)
        app.state.redis = aioredis.from_url(settings.redis_url)
        # Redis key names of this database (its identity namespaces every key).
        app.state.redis_keys = await RedisKeys.load(app.state.pool)
        try:
            await rest.startup(app)
            await ws.startup(app)
            # The live fan-out allocates per tick, and the cyclic collector's passes over every
            # connection's queues took ~15% of the API's CPU under load (issue 12 profile). So
            # what startup built is frozen out of collection and collections are rarer; the
            # fan-out creates no reference cycles, plain reference counting frees it.
            gc.freeze()
            gc.set_threshold(GC_GEN0_THRESHOLD, 50, 100)
            yield
        finally:
            await ws.shutdown(app)
            await rest.shutdown(app)
            await app.state.redis.aclose()
            await app.state.pool.close()

    app = FastAPI(
        title="Nadi",
        summary="Market data for Indian equities and derivatives: ticks, candles, replay, live.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    rest.install(app, settings)
    app.include_router(ws.router)
    return app
