"""``nadi simulate`` and ``nadi instruments load``: typer-compatible command functions.

Mounted by ``command/main.py`` as ``app.command("simulate")(simulate)``. Prints one JSON summary
line on stdout at the end (also after Ctrl-C or SIGTERM); progress and warnings go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from nadi.calendar import is_trading_day
from nadi.instruments import Instrument, bundled_instruments, load_kite_csv, upsert_instruments
from nadi.settings import get_settings
from nadi.times import NS, ist_date
from streaming.simulator.bhavcopy import write_bhavcopy
from streaming.simulator.feed import FeedSimulator, FeedStats
from streaming.simulator.generator import DEFAULT_DENSITY, DEFAULT_RATE, DayGenerator
from streaming.simulator.producer import TickProducer, ensure_topic
from streaming.simulator.recovery import GeneratorRegistry, create_recovery_app


def _note(event: str, **fields: object) -> None:
    """A progress line on stderr, looked up at call time (the stream may be swapped in tests)."""
    print(json.dumps({"event": event, **fields}, default=str), file=sys.stderr, flush=True)


def select_instruments(master: Sequence[Instrument], spec: str) -> list[Instrument]:
    """``spec``: empty (all), a count N (the first N of the master: equities come first), or a
    comma list of tokens and/or trading symbols (case-insensitive)."""
    spec = spec.strip()
    if not spec:
        return list(master)
    if spec.isdigit() and int(spec) <= len(master) and "," not in spec:
        n = int(spec)
        if n < 1:
            raise ValueError("--instruments count must be >= 1")
        return list(master[:n])
    by_token = {i.instrument_token: i for i in master}
    by_symbol = {i.tradingsymbol.upper(): i for i in master}
    out: list[Instrument] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        inst = by_token.get(int(item)) if item.isdigit() else by_symbol.get(item.upper())
        if inst is None:
            raise ValueError(f"--instruments: unknown instrument {item!r}")
        if inst not in out:
            out.append(inst)
    if not out:
        raise ValueError("--instruments selects nothing")
    return out


async def _load_master(dsn: str, instruments: Sequence[Instrument]) -> int:
    """Upsert the instrument master as ``dsn``: nadi_maint's (NADI_PG_MAINT_DSN), the role
    that loads reference data (dbt_or_sql/0013_roles.sql)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await upsert_instruments(conn, instruments)
    finally:
        await conn.close()


class _RecoveryServer:
    """uvicorn in a daemon thread (it skips signal handlers off the main thread)."""

    def __init__(self, registry: GeneratorRegistry, port: int) -> None:
        import uvicorn

        app = create_recovery_app(registry.seed, registry=registry)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="recovery", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _merge(total: FeedStats, s: FeedStats) -> None:
    total.ticks_in += s.ticks_in
    total.unique_sent += s.unique_sent
    total.sent.update(s.sent)
    total.reordered += s.reordered
    total.bad.update(s.bad)
    for tok, seqs in s.dropped.items():
        total.dropped[tok].extend(seqs)


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def simulate(
    rate: float | None = typer.Option(
        None,
        "--rate",
        help="ticks/s over all instruments; live default 1000, session default 0 (= max)",
    ),
    instruments: str = typer.Option(
        "", "--instruments", help="count N (first N), or comma list of tokens/symbols; default all"
    ),
    duration: float = typer.Option(
        0.0, "--duration", help="seconds of feed time; 0 = forever (live) / whole session"
    ),
    seed: int = typer.Option(42, "--seed", min=0),
    dup_rate: float = typer.Option(
        1.0, "--dup-rate", min=0.0, max=1.0, help="share of ticks also on feed B"
    ),
    gap_rate: float = typer.Option(
        0.0, "--gap-rate", min=0.0, max=1.0, help="share dropped on both feeds"
    ),
    reorder_rate: float = typer.Option(0.0, "--reorder-rate", min=0.0, max=1.0),
    bad_rate: float = typer.Option(
        0.0, "--bad-rate", min=0.0, max=1.0, help="malformed messages per tick"
    ),
    session_date: str | None = typer.Option(
        None, "--session-date", help="YYYY-MM-DD: replay that day's 09:15-15:30 IST session"
    ),
    density: float = typer.Option(
        DEFAULT_DENSITY, "--density", min=0.001, help="session mode: ticks per exchange-second"
    ),
    topic: str | None = typer.Option(None, "--topic", help="default NADI_TOPIC_TICKS"),
    recovery_port: int = typer.Option(8765, "--recovery-port", min=0, max=65535, help="0 disables"),
    bhavcopy_dir: Annotated[
        Path | None,
        typer.Option("--bhavcopy-dir", help="session mode: write the day's two bhavcopy zips here"),
    ] = None,
    load_instruments: bool = typer.Option(True, "--load-instruments/--no-load-instruments"),
    max_ticks: int = typer.Option(0, "--max-ticks", min=0, help="stop after N ticks (0: no limit)"),
) -> None:
    """Synthetic NSE feed (feeds A and B) into Kafka, with a retransmission server."""
    settings = get_settings()
    topic = topic or settings.topic_ticks
    session_day: date | None = None
    if session_date:
        try:
            session_day = date.fromisoformat(session_date)
        except ValueError:
            raise typer.BadParameter("--session-date must be YYYY-MM-DD") from None
        if not is_trading_day(session_day):
            raise typer.BadParameter(f"{session_day} is not an NSE trading day")
    live = session_day is None
    eff_rate = (DEFAULT_RATE if live else 0.0) if rate is None else rate
    if live and eff_rate <= 0:
        raise typer.BadParameter("--rate must be > 0 in live mode")
    start_ns = time.time_ns()
    first_day = ist_date(start_ns) if session_day is None else session_day
    try:
        select_instruments(bundled_instruments(first_day), instruments)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None

    def instruments_for(d: date) -> list[Instrument]:
        return select_instruments(bundled_instruments(d), instruments)

    registry = GeneratorRegistry(seed, instruments_for, density=density)
    if load_instruments:
        try:
            n = asyncio.run(_load_master(settings.maint_dsn, bundled_instruments(first_day)))
            _note("instruments loaded", rows=n)
        except Exception as e:  # the master may lag the feed (DESIGN.md 4): warn, go on
            _note("instruments not loaded", error=str(e))
    ensure_topic(settings.kafka_bootstrap, topic, settings.ticks_partitions)
    server: _RecoveryServer | None = None
    if recovery_port:
        if _port_free(recovery_port):
            server = _RecoveryServer(registry, recovery_port)
            server.start()
            _note("recovery server", url=f"http://127.0.0.1:{recovery_port}")
        else:
            _note("recovery port in use: no recovery server", port=recovery_port)

    producer = TickProducer(settings.kafka_bootstrap, topic)
    total = FeedStats()
    days: list[str] = []
    interrupted = False
    # SIGTERM (the supervisor's stop) ends the run like Ctrl-C: flush, then the summary.
    in_main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    t0 = time.perf_counter()
    try:
        if session_day is not None:
            gen = DayGenerator(instruments_for(session_day), seed, session_day, density=density)
            registry.register(gen)
            days.append(session_day.isoformat())
            feed = FeedSimulator(seed, session_day, dup_rate=dup_rate, gap_rate=gap_rate,
                                 reorder_rate=reorder_rate, bad_rate=bad_rate)  # fmt: skip
            until = gen.anchor_ns + int(duration * NS) if duration else None
            try:
                producer.send(
                    feed.messages(gen.stream(until_ns=until, max_ticks=max_ticks or None)),
                    rate=eff_rate,
                )
            finally:
                _merge(total, feed.stats)
            if bhavcopy_dir is not None:
                paths = write_bhavcopy(gen, bhavcopy_dir)
                _note("bhavcopy written", files=[str(p) for p in paths])
        else:
            anchor = start_ns
            deadline = start_ns + int(duration * NS) if duration else None
            while deadline is None or anchor < deadline:
                gen = DayGenerator(instruments_for(ist_date(anchor)), seed, mode="live",
                                   anchor_ns=anchor, rate=eff_rate)  # fmt: skip
                registry.register(gen)
                days.append(gen.trading_day.isoformat())
                feed = FeedSimulator(seed, gen.trading_day, dup_rate=dup_rate, gap_rate=gap_rate,
                                     reorder_rate=reorder_rate, bad_rate=bad_rate)  # fmt: skip
                until = gen.end_ns if deadline is None else min(deadline, gen.end_ns)
                left = max_ticks - total.ticks_in if max_ticks else None
                try:
                    producer.send(
                        feed.messages(gen.stream(until_ns=until, max_ticks=left)),
                        pace_by_exchange_ts=True,
                    )
                finally:
                    _merge(total, feed.stats)
                if max_ticks and total.ticks_in >= max_ticks:
                    break
                anchor = gen.end_ns  # a new trading day: sequences restart at 1
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, prev)
        undelivered = producer.close()
        if server is not None:
            server.stop()
    elapsed = time.perf_counter() - t0
    summary = {
        "mode": "live" if live else "session",
        "trading_days": days,
        "seed": seed,
        "topic": topic,
        **total.summary(),
        "delivered": producer.stats.delivered,
        "failed": producer.stats.failed + undelivered,
        "interrupted": interrupted,
        "elapsed_s": round(elapsed, 3),
        "ticks_per_s": round(total.ticks_in / elapsed, 1) if elapsed > 0 else 0.0,
    }
    print(json.dumps(summary), flush=True)
    if producer.stats.failed or undelivered:
        sys.exit(1)


def instruments_load(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Kite instruments CSV")],
) -> None:
    """Load Kite's instruments CSV into the ``instruments`` table (upsert by token)."""
    settings = get_settings()
    rows = load_kite_csv(path)
    n = asyncio.run(_load_master(settings.maint_dsn, rows))
    print(json.dumps({"loaded": n, "path": str(path)}))
