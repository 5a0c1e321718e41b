"""``nadi process``: one MarketDataProcessor worker (mounted by command/main.py)."""

from __future__ import annotations

import typer


def process(
    metrics_port: int = typer.Option(
        None, help="Prometheus port (default NADI_METRICS_PORT; 0 off)"
    ),
) -> None:
    """Run one MarketDataProcessor worker of consumer group NADI_GROUP_ID (SIGTERM drains)."""
    import asyncio

    from nadi.logs import configure
    from nadi.settings import get_settings
    from streaming.processor.worker import run_worker

    configure()
    settings = get_settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    asyncio.run(run_worker(settings))
