"""The FastAPI application: REST under /v1, the WebSocket hub at /ws, the live page at /.

``create_app`` wires the parts; the ``lifespan`` owns the asyncpg pool and the Redis client
(and starts/stops each part's background work through its ``startup``/``shutdown`` hooks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api import rest, ws
from nadi.db.pool import create_pool
from nadi.redis_keys import RedisKeys
from nadi.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(settings, min_size=2, max_size=10)
        app.state.redis = aioredis.from_url(settings.redis_url)
        # Redis key names of this database (its identity namespaces every key).
        app.state.redis_keys = await RedisKeys.load(app.state.pool)
        try:
            await rest.startup(app)
            await ws.startup(app)
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
    app.include_router(rest.router)
    app.include_router(ws.router)
    return app
