"""``nadi bench ws``: many WebSocket clients, some never reading.

The stack of ``bench latency`` (processor + API subprocesses) takes ``rate`` ticks/s over 50
instruments. ``connections - stalled`` reading clients (spread over ``client_procs`` client
processes, each connection subscribed to one instrument, round-robin) record produce ->
receive latency in two phases of ``phase`` seconds each: phase 1 without, phase 2 with
``stalled`` more connections (their own process, tiny receive buffers) that subscribe and never
read. The API's RSS is sampled per phase. Target: phase-2 p99 <= 1.2 x phase-1 p99, RSS bounded
(the outbound queues are bounded: ``ws_queue_size`` messages per connection).

A thundering herd (issue 10): every connection, readers and stalled ones, is opened at the same
wall-clock instant (``connect_spread_s`` says how close together they got); the readers
subscribe at once, the stalled ones only when phase 1 ends. ``reader_failures`` counts readers
that failed to connect, subscribe or read (target 0).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import time
from typing import Any

import typer

from bench import wsstack
from bench.common import PeakRss, emit
from nadi.settings import Settings, get_settings


def _readers(
    url: str,
    first: int,
    n: int,
    connect_at: float,
    phases: list[tuple[float, float]],
    end_at: float,
    out: Any,
) -> None:
    """Client process: ``n`` reading connections, all opened at ``connect_at``; one latency
    histogram per phase -> ``out``."""
    from websockets.asyncio.client import connect

    hists = [wsstack.new_hist() for _ in phases]
    counts = [0 for _ in phases]
    errors: list[str] = []
    opened: list[float] = []

    async def one(k: int) -> None:
        tok = wsstack.TOKENS[(first + k) % len(wsstack.TOKENS)]
        try:
            async with connect(
                url, compression=None, proxy=None, max_size=None, open_timeout=60
            ) as ws:
                opened.append(time.time())
                await wsstack.subscribe(ws, [tok])
                while time.time() < end_at:
                    try:
                        data = await asyncio.wait_for(ws.recv(), max(0.01, end_at - time.time()))
                    except TimeoutError:
                        return
                    now = time.time_ns()
                    t = now / 1e9
                    for i, (a, b) in enumerate(phases):
                        if a <= t < b:
                            counts[i] += wsstack.record_frame(hists[i], data, now)
        except Exception as e:  # reported, not fatal: the run says how many failed
            errors.append(f"{type(e).__name__}: {e}")

    async def main() -> None:
        await asyncio.sleep(max(0.0, connect_at - time.time()))
        # All at once: a restarted API sees every screen reconnect in the same second.
        await asyncio.gather(*(one(k) for k in range(n)))

    asyncio.run(main())
    out.put({"hists": hists, "counts": counts, "errors": errors[:5], "failed": len(errors),
             "opened": opened and [min(opened), max(opened)]})  # fmt: skip


def _stallers(
    url: str, n: int, connect_at: float, subscribe_at: float, end_at: float, out: Any
) -> None:
    """Client process: ``n`` connections opened at ``connect_at`` (with the readers) that
    wsstack.subscribe at ``subscribe_at`` and then never read."""
    from websockets.asyncio.client import connect

    opened: list[float] = []

    async def one(k: int) -> Any:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        ws = await connect(url, sock=sock, compression=None, proxy=None, max_queue=1,
                           open_timeout=60, close_timeout=1).__aenter__()  # fmt: skip
        opened.append(time.time())
        await asyncio.sleep(max(0.0, subscribe_at - time.time()))
        await wsstack.subscribe(ws, [wsstack.TOKENS[k % len(wsstack.TOKENS)]])
        return ws

    async def main() -> None:
        await asyncio.sleep(max(0.0, connect_at - time.time()))
        conns = await asyncio.gather(*(one(k) for k in range(n)), return_exceptions=True)
        ok = [c for c in conns if not isinstance(c, BaseException)]
        await asyncio.sleep(max(0.0, end_at - time.time()))  # never read
        closed_by_server = sum(1 for c in ok if c.state.name != "OPEN")
        out.put({"stalled_connected": len(ok), "closed_by_server": closed_by_server,
                 "opened": opened and [min(opened), max(opened)]})  # fmt: skip
        for c in ok:
            c.transport.abort()

    asyncio.run(main())


async def run(
    base: Settings,
    connections: int,
    stalled: int,
    rate: int,
    phase_s: float,
    client_procs: int,
    stall_timeout_s: float,
) -> dict[str, object]:
    readers = connections - stalled
    async with wsstack.running_stack(
        base, "ws", ws_stall_timeout_s=stall_timeout_s, ws_max_connections_per_key=connections + 10
    ) as stack:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        # Timeline (wall clock): every connection opens at connect_at (the client processes
        # have started by then) and the readers subscribe; warm-up 3 s; phase 1; stallers
        # subscribe and fill their buffers for 5 s; phase 2.
        connect_at = time.time() + 8
        t0 = connect_at + 10 + readers / 100  # time for every reader to subscribe
        p1 = (t0 + 3, t0 + 3 + phase_s)
        p2 = (p1[1] + 5, p1[1] + 5 + phase_s)
        end_at = p2[1] + 1
        per = [
            readers // client_procs + (1 if i < readers % client_procs else 0)
            for i in range(client_procs)
        ]
        procs = []
        first = 0
        for n in per:
            procs.append(
                ctx.Process(
                    target=_readers,
                    args=(stack.ws_url, first, n, connect_at, [p1, p2], end_at, out),
                )
            )
            first += n
        procs.append(
            ctx.Process(
                target=_stallers,
                args=(stack.ws_url, stalled, connect_at, p1[1], end_at, out),
            )
        )
        for p in procs:
            p.start()
        producer = wsstack.start_producer(stack.settings, rate, p2[1] - t0 + 0.5, t0)
        rss = [PeakRss(stack.api.pid, 0.1) for _ in range(2)]
        for i, (a, b) in enumerate((p1, p2)):
            await asyncio.sleep(max(0.0, a - time.time()))
            rss[i].start()
            await asyncio.sleep(max(0.0, b - time.time()))
            await rss[i].stop()
        results = [await asyncio.to_thread(out.get, True, 120) for _ in procs]
        for p in (*procs, producer):
            await asyncio.to_thread(p.join, 30)
    reads = [r for r in results if "hists" in r]
    (stall,) = [r for r in results if "stalled_connected" in r]
    h1 = wsstack.merge([r["hists"][0] for r in reads])
    h2 = wsstack.merge([r["hists"][1] for r in reads])
    p99_1, p99_2 = wsstack.percentile_ms(h1, 0.99), wsstack.percentile_ms(h2, 0.99)
    spans = [r["opened"] for r in results if r.get("opened")]
    spread = round(max(b for _, b in spans) - min(a for a, _ in spans), 2) if spans else None
    stall.pop("opened", None)
    return {
        "connections": connections,
        "stalled": stalled,
        "rate": rate,
        "phase_s": phase_s,
        "client_procs": client_procs,
        "connect_spread_s": spread,  # first to last connection opened (all start at once)
        "delivered_per_s": [round(sum(r["counts"][i] for r in reads) / phase_s) for i in (0, 1)],
        "p50_ms": [wsstack.percentile_ms(h1, 0.5), wsstack.percentile_ms(h2, 0.5)],
        "p99_ms": [p99_1, p99_2],
        "p99_ratio": round(p99_2 / p99_1, 2) if p99_1 and p99_2 else None,
        "api_peak_rss_mb": [rss[0].peak_mb, rss[1].peak_mb],
        "reader_failures": sum(r["failed"] for r in reads),
        "reader_errors": [e for r in reads for e in r["errors"]][:3],
        **stall,
        "stall_timeout_s": stall_timeout_s,
        "target": "p99 with stalled <= 1.2 x without; RSS bounded",
    }


def bench_ws(
    connections: int = typer.Option(1000, min=2, help="WebSocket connections in all"),
    stalled: int = typer.Option(100, min=0, help="of which never read"),
    rate: int = typer.Option(10_000, min=1, help="ticks/s produced"),
    phase: float = typer.Option(20.0, min=1, help="seconds per phase (without, with stalled)"),
    client_procs: int = typer.Option(2, min=1, help="processes for the reading clients"),
    stall_timeout: float = typer.Option(
        60.0,
        min=0.1,
        help="NADI_WS_STALL_TIMEOUT_S for the API (longer than the phase keeps "
        "the stalled clients connected throughout)",
    ),
) -> None:
    """Others' p99 and server RSS with and without clients that never read."""
    settings = get_settings()
    emit(
        settings,
        "ws",
        asyncio.run(run(settings, connections, stalled, rate, phase, client_procs, stall_timeout)),
    )
