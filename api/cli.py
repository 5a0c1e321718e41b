"""`nadi api`: serve the FastAPI app with uvicorn, in one or several processes."""

from __future__ import annotations

import os

import typer

from api.auth import check_bind_address
from nadi.settings import Settings, get_settings

MAX_AUTO_WORKERS = 8


def workers_for_machine(settings: Settings) -> int:
    """API processes for this machine: ``api_workers`` when set, else one per two usable CPUs
    (1 to 8). The API shares the machine with the processor, Redis, Kafka and PostgreSQL, and
    each process reads the whole live stream, so more processes than that buys little."""
    if settings.api_workers > 0:
        return settings.api_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_AUTO_WORKERS, (cpus or 1) // 2))


def api(
    host: str = typer.Option(None, help="bind address (default NADI_API_HOST, 127.0.0.1)"),
    port: int = typer.Option(None, help="port (default NADI_API_PORT, 8000)"),
    workers: int = typer.Option(
        None, min=1, help="API processes (default NADI_API_WORKERS; 0 there: chosen per machine)"
    ),
) -> None:
    """The FastAPI server: REST under /v1, WebSocket /ws, live page /, OpenAPI /docs.

    With several workers, uvicorn's supervisor runs them on one listening socket (the kernel
    hands each new connection to one of them) and restarts one that dies; each worker has its
    own live-stream reader, so every connection gets every tick once, in order, whichever
    process holds it. Per-key connection limits count over all processes (shared in Redis)."""
    import uvicorn

    settings = get_settings()
    host = host or settings.api_host
    port = port or settings.api_port
    check_bind_address(settings, host)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers or workers_for_machine(settings),
        loop="uvloop",  # the profile's event-loop share is lower with uvloop (issue 12)
        log_level="info",
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,  # compressing every small frame costs more than it saves
        proxy_headers=False,
    )
