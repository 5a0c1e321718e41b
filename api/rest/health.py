"""``/healthz`` (liveness), ``/readyz`` (PostgreSQL and Redis reachable), ``/metrics``
(Prometheus). Open without an API key: probes and scrapers carry none."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.rest.deps import Pool, Redis
from api.rest.models import Health, Readiness

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0  # a probe must answer well inside a kubelet/LB timeout


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves requests")
async def healthz() -> Health:
    return Health(status="ok")


async def _check(coro: object) -> str:
    try:
        await asyncio.wait_for(coro, CHECK_TIMEOUT_S)  # type: ignore[arg-type]
    except TimeoutError:
        return f"error: no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a dependency is down"}},
    summary="Readiness: PostgreSQL and Redis answer",
)
async def readyz(pool: Pool, redis: Redis, response: Response) -> Readiness:
    pg, rd = await asyncio.gather(_check(pool.fetchval("SELECT 1")), _check(redis.ping()))
    checks = {"postgres": pg, "redis": rd}
    if pg != "ok" or rd != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(status="unavailable", checks=checks)
    return Readiness(status="ready", checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics of this process",
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
