"""``nadi bench latency``: produce -> Kafka -> processor -> Redis -> API hub -> WebSocket client.

A producer process sends ``rate`` ticks/s over 50 instruments for ``duration`` seconds with
``exchange_ts`` = its wall clock; one client subscribed to all 50 records receive time -
exchange_ts for every tick. The first ``warmup`` seconds are not counted. Targets: p50 <= 10 ms,
p99 <= 50 ms.
"""

from __future__ import annotations

import asyncio
import time

import typer
from websockets.asyncio.client import connect

from bench import wsstack
from bench.common import PeakRss, emit
from nadi.settings import Settings, get_settings


async def run(base: Settings, rate: int, duration_s: float, warmup_s: float) -> dict[str, object]:
    async with wsstack.running_stack(base, "latency") as stack:
        hist = wsstack.new_hist()
        to_ring = wsstack.new_hist()
        received = 0
        async with connect(stack.ws_url, compression=None, proxy=None, max_size=None) as ws:
            await wsstack.subscribe(ws, wsstack.TOKENS)
            rss = PeakRss(stack.api.pid)
            rss.start()
            start_at = time.time() + 1.0
            producer = wsstack.start_producer(stack.settings, rate, warmup_s + duration_s, start_at)
            count_from = start_at + warmup_s
            stop_at = start_at + warmup_s + duration_s + 2.0  # the tail still in flight
            discard = wsstack.new_hist()
            while time.time() < stop_at:
                try:
                    data = await asyncio.wait_for(ws.recv(), max(0.01, stop_at - time.time()))
                except TimeoutError:
                    break
                now = time.time_ns()
                if now / 1e9 < count_from:
                    wsstack.record_frame(discard, data, now)
                else:
                    received += wsstack.record_frame(hist, data, now, to_ring)
            await rss.stop()
            await asyncio.to_thread(producer.join, 30)

        return {
            "rate": rate,
            "duration_s": duration_s,
            "instruments": len(wsstack.TOKENS),
            "received": received,
            "received_per_s": round(received / duration_s),
            "p50_ms": wsstack.percentile_ms(hist, 0.50),
            "p99_ms": wsstack.percentile_ms(hist, 0.99),
            "p999_ms": wsstack.percentile_ms(hist, 0.999),
            "max_ms": wsstack.percentile_ms(hist, 1.0),
            # Where the time goes: produce -> ring append (Kafka + processor batch), at the
            # ring id's 1 ms resolution; the rest is the hub and the socket.
            "to_ring_p50_ms": wsstack.percentile_ms(to_ring, 0.50),
            "to_ring_p99_ms": wsstack.percentile_ms(to_ring, 0.99),
            "api_peak_rss_mb": rss.peak_mb,
            "targets": {"p50_ms": 10, "p99_ms": 50},
        }


def bench_latency(
    rate: int = typer.Option(10_000, min=1, help="ticks/s produced"),
    duration: float = typer.Option(60.0, min=1, help="measured seconds"),
    warmup: float = typer.Option(3.0, min=0, help="seconds produced but not counted"),
) -> None:
    """Produce -> WebSocket receive latency (p50/p99) at a set rate, through the whole stack."""
    settings = get_settings()
    emit(settings, "latency", asyncio.run(run(settings, rate, duration, warmup)))
