"""`nadi api`: serve the FastAPI app with uvicorn."""

from __future__ import annotations

import typer

from api.auth import check_bind_address
from nadi.settings import get_settings


def api(
    host: str = typer.Option(None, help="bind address (default NADI_API_HOST, 127.0.0.1)"),
    port: int = typer.Option(None, help="port (default NADI_API_PORT, 8000)"),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes"),
) -> None:
    """The FastAPI server: REST under /v1, WebSocket /ws, live page /, OpenAPI /docs."""
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
        workers=workers,
        log_level="info",
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,  # compressing every small frame costs more than it saves
        proxy_headers=False,
    )
