"""Shared dependencies of the REST routes: the asyncpg pool and the Redis client that the app's
lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, Request


def get_pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


def get_redis(request: Request) -> aioredis.Redis:
    client: aioredis.Redis = request.app.state.redis
    return client


Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
Redis = Annotated[aioredis.Redis, Depends(get_redis)]
