"""The WebSocket hub at /ws and the live page (DESIGN.md sections 6 and 7).

Modules: ``protocol`` (messages), ``hub`` (the one live-stream reader per process and the
connection registry), ``connection`` (per-client bounded queue and writer), ``catchup`` (``since``
-> ring/database -> live), ``router`` (admission, the session loop, the page).
"""

from __future__ import annotations

from fastapi import FastAPI

from api.ws.catchup import CatchUp
from api.ws.hub import Hub
from api.ws.router import router

__all__ = ["router", "shutdown", "startup"]


async def startup(app: FastAPI) -> None:
    """Start the live fan-out reader for this API process (owned by ``app.state.ws_hub``)."""
    settings = app.state.settings
    hub = Hub(
        app.state.redis,
        app.state.redis_keys,
        stall_timeout_s=settings.ws_stall_timeout_s,
        max_connections_per_key=settings.ws_max_connections_per_key,
        queue_size=settings.ws_queue_size,
    )
    await hub.start()
    app.state.ws_hub = hub
    app.state.ws_catchup = CatchUp(
        app.state.redis,
        app.state.redis_keys,
        getattr(app.state, "pool", None),
        chunk_rows=settings.replay_chunk_rows,
        max_future_skew_s=settings.max_future_skew_s,
    )


async def shutdown(app: FastAPI) -> None:
    """Stop the reader and close every connection."""
    hub: Hub | None = getattr(app.state, "ws_hub", None)
    if hub is not None:
        await hub.stop()
