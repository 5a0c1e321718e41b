"""The status line of `nadi up` (issue 13): what matters, every ``NADI_STATUS_INTERVAL_S``.

``collect`` takes a :class:`Snapshot` from the running platform: Kafka (ticks in = the input
topic's end offsets, the group's lag, dead letters = the DLQ topic's end offsets), each
processor worker's metrics (ticks stored), the API's metrics (WebSocket clients) and the
exporter's (gaps, Dagster runs). Every collector has a deadline and leaves its fields ``None``
when it misses it, so one part down never holds the line up. ``status_line`` turns two
snapshots into the line: a pure function, unit-tested (tests/test_console.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nadi.settings import Settings
from nadi.times import IST

DEADLINE_S = 3.0  # well inside the status period: a busy machine answers late
T = TypeVar("T")

Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)


@dataclass(frozen=True)
class Snapshot:
    """What the platform looked like at ``at`` (monotonic seconds). ``None``: not known (the
    source did not answer within its deadline, or does not export the figure)."""

    at: float
    wall: datetime
    ticks_in: int | None = None  # sum of the input topic's end offsets
    stored: Mapping[str, float] = field(default_factory=dict)  # worker -> ticks stored (counter)
    workers: int = 0  # workers expected
    lag: int | None = None
    dlq: int | None = None  # sum of the DLQ topic's end offsets
    gaps_open: int | None = None
    gaps_oldest_s: float | None = None
    gaps_repaired_today: int | None = None
    gaps_unrecoverable_today: int | None = None
    ws_clients: int | None = None
    api_up: bool = False
    runs_queued: int | None = None
    runs_running: int | None = None
    runs_failed_today: int | None = None
    sensor_age_s: float | None = None
    market_open: bool | None = None


def _n(v: float | None) -> str:
    return "?" if v is None else f"{v:,.0f}"


def _age(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def _rate(prev: float | None, cur: float | None, dt: float) -> float | None:
    if prev is None or cur is None or dt <= 0:
        return None
    return max(0.0, cur - prev) / dt


def stored_rate(prev: Snapshot, cur: Snapshot) -> float | None:
    """Ticks stored per second over all workers. A worker whose counter went down restarted:
    its count since the restart is what it stored in the interval (at least)."""
    dt = cur.at - prev.at
    if not cur.stored or dt <= 0:
        return None
    total = 0.0
    for worker, n in cur.stored.items():
        before = prev.stored.get(worker)
        total += n if before is None or n < before else n - before
    return total / dt


def status_line(prev: Snapshot | None, cur: Snapshot) -> str:
    """One line: rates over ``prev`` → ``cur`` (``?`` on the first line or a missing figure)."""
    dt = cur.at - prev.at if prev else 0.0
    tin = _rate(prev.ticks_in, cur.ticks_in, dt) if prev else None
    stored = stored_rate(prev, cur) if prev else None
    dlq_new = cur.dlq - prev.dlq if prev and prev.dlq is not None and cur.dlq is not None else None
    parts = [
        cur.wall.astimezone(IST).strftime("%H:%M:%S IST"),
        # in: messages on the input topic (both feeds); stored: new rows (duplicates dropped)
        f"ticks/s kafka {_n(tin)} stored {_n(stored)}",
        f"lag {_n(cur.lag)}",
        f"gaps open {_n(cur.gaps_open)}"
        + (f" (oldest {_age(cur.gaps_oldest_s)})" if cur.gaps_open else "")
        + f" repaired today {_n(cur.gaps_repaired_today)}"
        + (
            f" unrecoverable {cur.gaps_unrecoverable_today}" if cur.gaps_unrecoverable_today else ""
        ),
        f"ws {_n(cur.ws_clients)}",
        f"dlq {_n(cur.dlq)}" + (f" (+{dlq_new})" if dlq_new else ""),
        f"runs queued {_n(cur.runs_queued)} running {_n(cur.runs_running)}"
        f" failed today {_n(cur.runs_failed_today)}",
    ]
    down = []
    if len(cur.stored) < cur.workers:
        down.append(f"workers {len(cur.stored)}/{cur.workers}")
    if not cur.api_up:
        down.append("api not answering")
    if cur.sensor_age_s is not None and cur.sensor_age_s > 180:
        down.append(f"sensor idle {_age(cur.sensor_age_s)}")
    if down:
        parts.append("!! " + ", ".join(down))
    if cur.market_open is not None:
        parts.append("market open" if cur.market_open else "market closed")
    return " | ".join(parts)


# ---- collectors ---------------------------------------------------------------------------


def parse_samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _sum(samples: Samples, name: str, **labels: str) -> float | None:
    rows = [
        v
        for lab, v in samples.get(name, [])
        if all(lab.get(k) == want for k, want in labels.items())
    ]
    return sum(rows) if rows else None


def _int(v: float | None) -> int | None:
    return None if v is None or math.isnan(v) else int(v)


async def _scrape(client: httpx.AsyncClient, url: str) -> Samples | None:
    try:
        r = await client.get(url)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_samples(r.text)


class Collector:
    """Takes snapshots. A blocking part (Kafka's client) that overruns its deadline is left to
    finish in its thread and not started again until it has."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._client = httpx.AsyncClient(timeout=DEADLINE_S)
        self._kafka: asyncio.Task[object] | None = None

    async def close(self) -> None:
        await self._client.aclose()

    async def _deadline(self, work: Awaitable[T]) -> T | None:
        try:
            return await asyncio.wait_for(work, DEADLINE_S)
        except Exception:  # a source that is down or slow leaves its figures unknown
            return None

    async def _kafka_figures(self) -> object:
        from pipelines.exporter import collect_kafka, in_daemon_thread

        if self._kafka is None or self._kafka.done():
            self._kafka = asyncio.create_task(in_daemon_thread(collect_kafka, self.s))
        return await asyncio.shield(self._kafka)

    async def collect(self, clock: Callable[[], float]) -> Snapshot:
        from pipelines.exporter import KafkaFigures

        s = self.s
        workers = [f"http://127.0.0.1:{s.metrics_port + i}/metrics" for i in range(s.demo_workers)]
        api = f"http://{s.api_host}:{s.api_port}/metrics"
        exporter = f"http://127.0.0.1:{s.exporter_port}/metrics"
        kafka, api_m, exp_m, *worker_m = await asyncio.gather(
            self._deadline(self._kafka_figures()),
            self._deadline(_scrape(self._client, api)),
            self._deadline(_scrape(self._client, exporter)),
            *(self._deadline(_scrape(self._client, u)) for u in workers),
        )
        k = kafka if isinstance(kafka, KafkaFigures) else KafkaFigures({}, {})
        a: Samples = api_m if isinstance(api_m, dict) else {}
        e: Samples = exp_m if isinstance(exp_m, dict) else {}
        running = [_sum(e, "nadi_dagster_runs", status=x) for x in ("STARTING", "STARTED")]
        market = _sum(e, "nadi_market_open")
        return Snapshot(
            at=clock(),
            wall=datetime.now(IST),
            ticks_in=k.end.get(s.topic_ticks),
            stored={
                f"process-{i + 1}": _sum(m, "nadi_ticks_stored_total") or 0.0
                for i, m in enumerate(worker_m)
                if isinstance(m, dict)
            },
            workers=len(workers),
            lag=k.lag.get(s.topic_ticks),
            dlq=k.end.get(s.topic_dlq),
            gaps_open=_int(_sum(e, "nadi_gaps_open")),
            gaps_oldest_s=_sum(e, "nadi_gaps_oldest_open_age_seconds"),
            gaps_repaired_today=_int(_sum(e, "nadi_gaps_repaired_today")),
            gaps_unrecoverable_today=_int(_sum(e, "nadi_gaps_today", status="unrecoverable")),
            ws_clients=_int(_sum(a, "nadi_ws_connections")),
            api_up=api_m is not None,
            runs_queued=_int(_sum(e, "nadi_dagster_runs", status="QUEUED")),
            runs_running=None if None in running else _int(sum(v or 0.0 for v in running)),
            runs_failed_today=_int(_sum(e, "nadi_dagster_runs_failed_today")),
            sensor_age_s=_sum(
                e, "nadi_dagster_sensor_last_tick_age_seconds", sensor="gap_repair_sensor"
            ),
            market_open=None if market is None else bool(market),
        )


async def run_status(settings: Settings, emit: Callable[[str], None], stop: asyncio.Event) -> None:
    """Emit a status line every ``status_interval_s`` until ``stop``."""
    import time

    collector = Collector(settings)
    prev: Snapshot | None = None
    period = settings.status_interval_s
    next_at = time.monotonic() + period
    try:
        while not stop.is_set():
            try:  # a fixed cadence: the time collecting takes is not added to the period
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
                break
            except TimeoutError:
                pass
            next_at += period
            cur = await collector.collect(time.monotonic)
            emit(status_line(prev, cur))
            prev = cur
    finally:
        await collector.close()
