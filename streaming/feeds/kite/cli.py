"""``nadi feed kite``: the Kite Connect ticker into ``ticks.raw``.

Mounted by ``command/main.py``. Runs until Ctrl-C or SIGTERM, then prints one JSON summary
line on stdout; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from nadi.settings import Settings, get_settings
from streaming.feeds.kite.config import KiteFeedConfig
from streaming.feeds.kite.protocol import Mode
from streaming.feeds.kite.subscriptions import (
    parse_symbols,
    parse_tokens,
    read_instruments_file,
    resolve_symbols,
    split,
)


def build_config(
    settings: Settings,
    tokens: str,
    instruments_file: Path | None,
    mode: Mode,
    topic: str | None,
    symbols: str = "",
) -> KiteFeedConfig:
    """The feed's configuration from the settings and the command line (ValueError if wrong).
    ``symbols`` are looked up in the instrument master (as nadi_ingest)."""
    chosen = parse_tokens(tokens)
    if instruments_file is not None:
        chosen += read_instruments_file(instruments_file)
    if wanted := parse_symbols(symbols):
        chosen += asyncio.run(_lookup(settings.ingest_dsn, wanted))
    if not chosen:
        raise ValueError("give --tokens, --instruments-file or --symbols")
    return KiteFeedConfig(
        ws_url=settings.kite_ws_url,
        api_key=settings.kite_api_key,
        access_token=settings.kite_access_token,
        connections=split(chosen),
        mode=mode,
        topic=topic or settings.topic_ticks,
        heartbeat_timeout_s=settings.kite_heartbeat_timeout_s,
        reconnect_max_delay_s=settings.kite_reconnect_max_delay_s,
    )


async def _lookup(dsn: str, symbols: list[tuple[str, str]]) -> list[int]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await resolve_symbols(conn, symbols)
    finally:
        await conn.close()


async def run_feed(settings: Settings, config: KiteFeedConfig) -> dict[str, object]:
    """Run the feed until cancelled; returns its summary."""
    from nadi.db.pool import create_pool
    from streaming.feeds.kite.config import FEED_NAME
    from streaming.feeds.kite.feed import KafkaTickSink, KiteFeed
    from streaming.feeds.kite.state import FeedState

    pool = await create_pool(settings, dsn=settings.ingest_dsn, max_size=2)
    sink = KafkaTickSink(settings.kafka_bootstrap, config.topic)
    feed = KiteFeed(config, FeedState(pool, FEED_NAME), sink)
    try:
        await sink.start()
        await feed.run()
    except asyncio.CancelledError:
        pass
    finally:
        await sink.stop()  # flushes what was sent
        await pool.close()
    s = feed.stats
    return {
        "feed": FEED_NAME,
        "frames": s.frames,
        "heartbeats": s.heartbeats,
        "packets": dict(s.packets),
        "ticks": s.ticks,
        "no_price": s.no_price,
        "bad": dict(s.bad),
        "text": dict(s.text),
        "reconnects": sum(c.reconnects for c in feed.connections),
    }


async def _main(settings: Settings, config: KiteFeedConfig) -> dict[str, object]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run_feed(settings, config)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def feed_kite(
    tokens: str = typer.Option("", "--tokens", help="comma list of instrument tokens"),
    instruments_file: Annotated[
        Path | None,
        typer.Option(
            "--instruments-file",
            help="Kite instruments CSV (instrument_token column) or one token per line",
        ),
    ] = None,
    symbols: str = typer.Option(
        "", "--symbols", help="comma list of EXCHANGE:TRADINGSYMBOL, from the instrument master"
    ),
    mode: Annotated[Mode, typer.Option("--mode", help="ltp | quote | full")] = Mode.FULL,
    topic: str | None = typer.Option(None, "--topic", help="default NADI_TOPIC_TICKS"),
) -> None:
    """Kite Connect ticker -> ticks.raw (NADI_KITE_WS_URL, NADI_KITE_API_KEY, NADI_KITE_ACCESS_TOKEN)."""
    from nadi.logs import configure

    settings = get_settings()
    try:
        config = build_config(settings, tokens, instruments_file, mode, topic, symbols)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    configure()
    if settings.kite_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.kite_metrics_port, addr="127.0.0.1")
    summary = asyncio.run(_main(settings, config))
    print(json.dumps(summary), flush=True)
    sys.stdout.flush()
