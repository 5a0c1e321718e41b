"""REST under /v1 (DESIGN.md section 7), plus /healthz, /readyz and /metrics.

Every /v1 route depends on the API key (``api.auth.require_api_key``; a no-op while
``NADI_API_KEYS`` is unset); the probes and the metrics endpoint stay open.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from api.auth import require_api_key
from api.rest import candles, gaps, health, instruments, replay, ticks

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
for _part in (instruments, ticks, candles, gaps, replay):
    v1.include_router(_part.router)

router = APIRouter()
router.include_router(v1)
router.include_router(health.router)


async def startup(app: FastAPI) -> None:
    """Background work of the REST part (none: every route is request-scoped)."""


async def shutdown(app: FastAPI) -> None:
    """Stop what startup started."""
