"""REST under /v1 (DESIGN.md section 7), plus /healthz, /readyz and /metrics.

Every /v1 route declares the scope it needs (``api.auth.scoped``: read, or replay for
/v1/replay; a no-op while ``NADI_API_KEYS`` is unset); the probes and the metrics endpoint stay
open. ``install`` adds the error handlers (one ``{"detail": str}`` shape) and the OpenAPI
document that says all this.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from api.rest import candles, errors, gaps, health, instruments, openapi, replay, ticks
from nadi.settings import Settings

v1 = APIRouter(prefix="/v1")
for _part in (instruments, ticks, candles, gaps, replay):
    v1.include_router(_part.router)

router = APIRouter()
router.include_router(v1)
router.include_router(health.router)


def install(app: FastAPI, settings: Settings) -> None:
    """Routes, error handlers and the OpenAPI document of the REST part."""
    app.include_router(router)
    errors.install(app)
    openapi.install(app, settings)


async def startup(app: FastAPI) -> None:
    """Background work of the REST part (none: every route is request-scoped)."""


async def shutdown(app: FastAPI) -> None:
    """Stop what startup started."""
