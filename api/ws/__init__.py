"""The WebSocket hub at /ws and the live page (DESIGN.md sections 6 and 7).

Modules: ``protocol`` (messages), ``hub`` (the one live-stream reader per process and the
connection registry), ``connection`` (per-client lanes and writer), ``catchup`` (``since``
-> ring/database -> live, paced by the client, reads bounded per process), ``router``
(admission, limits, the session loop, the page).
"""

from __future__ import annotations

from fastapi import FastAPI

from api.ws.catchup import CatchUp
from api.ws.hub import Hub
from api.ws.router import router

__all__ = ["router", "shutdown", "startup"]


async def startup(app: FastAPI) -> None:
    """Start the live fan-out reader for this API process (owned by ``app.state.ws_hub``) and
    the catch-up runner (``app.state.ws_catchup``, which owns its Redis client)."""
    settings = app.state.settings
    hub = Hub(
        app.state.redis,
        app.state.redis_keys,
        stall_timeout_s=settings.ws_stall_timeout_s,
        max_connections_per_key=settings.ws_max_connections_per_key,
        queue_size=settings.ws_queue_size,
        max_frame_bytes=settings.ws_max_frame_bytes,
        flush_interval_ms=settings.ws_flush_interval_ms,
    )
    await hub.start()
    app.state.ws_hub = hub
    # Catch-up reads get their own Redis client, with exactly as many connections as reads may
    # be in flight: a herd of subscribers queues for a permit instead of exhausting the shared
    # client's pool (which REST, the hub's reader and health checks need too).
    app.state.ws_catchup = CatchUp(
        CatchUp.redis_client(settings.redis_url, settings.ws_catchup_concurrency),
        app.state.redis_keys,
        getattr(app.state, "pool", None),
        concurrency=settings.ws_catchup_concurrency,
        max_future_skew_s=settings.max_future_skew_s,
    )


async def shutdown(app: FastAPI) -> None:
    """Stop the reader, close every connection, then the catch-up's Redis client."""
    hub: Hub | None = getattr(app.state, "ws_hub", None)
    if hub is not None:
        await hub.stop()
    catchup: CatchUp | None = getattr(app.state, "ws_catchup", None)
    if catchup is not None:
        await catchup.aclose()
