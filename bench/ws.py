"""``nadi bench ws``: many WebSocket clients, some never reading, with native load clients.

The stack of ``bench latency`` (processor + API subprocesses) takes ``rate`` ticks/s over 50
instruments. ``connections - stalled`` reading clients, each subscribed to one instrument
(round-robin), record produce -> receive latency in two phases of ``phase`` seconds each:
phase 1 without, phase 2 with ``stalled`` more connections (tiny receive buffers) that
subscribe when phase 1 ends and never read. The API's RSS is sampled per phase.

The clients are native (``bench/wsload``, Go, built on first use): Python clients cannot absorb
~180k msgs/s on two cores, so with them the figures were partly the clients' own (issue 12).
Every connection opens at the same wall-clock instant (a thundering herd, issue 10), or
``--open-rate`` connections per second. ``reader_failures`` counts readers that failed to
connect, subscribe or read (target 0).

``--peer centrifugo`` then runs the same clients, instruments, rate and stalled connections
against a local Centrifugo (``infra/centrifugo.py``) fed by a native publisher through its HTTP
batch API, and prints both sides in one line. Nothing here passes a client-bound or
publisher-bound run as a server figure: ``short_of_offered`` names whichever fell short.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import psutil
import typer

from bench import wsload, wsstack
from bench.common import emit
from infra.centrifugo import CHANNEL, Centrifugo
from infra.paths import Paths
from nadi.settings import Settings, get_settings

# Time the readers' own socket buffers may add (mean; and 10% of the p50) before the run counts
# as client-bound.
CLIENT_QUEUE_MS = 10.0
# Runnable processes per core (1-minute load average) above which a run measures the machine.
MACHINE_LOAD = 3.0  # the run itself keeps about 4-5 tasks runnable on its own
SHORT = 0.95  # below this share of the offered rate a publisher or a server falls short


def timeline(connections: int, open_rate: float, phase_s: float, lead_s: float) -> dict[str, Any]:
    """Wall-clock instants of one run: every connection opens from ``connect_at`` (at once, or
    ``open_rate`` per second), the readers subscribe as they open; publishing starts at ``t0``,
    phase 1 after a 3 s warm-up; the stalled connections subscribe when it ends and fill their
    buffers for 5 s; phase 2."""
    connect_at = time.time() + lead_s
    opening = connections / open_rate if open_rate > 0 else 0.0
    t0 = connect_at + opening + 10
    p1 = (t0 + 3, t0 + 3 + phase_s)
    p2 = (p1[1] + 5, p1[1] + 5 + phase_s)
    return {"connect_at": connect_at, "t0": t0, "phases": [p1, p2], "end_at": p2[1] + 1}


def client_config(
    url: str, protocol: str, readers: int, stalled: int, open_rate: float, mode: str | None,
    tl: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "url": url,
        "protocol": protocol,
        "readers": readers,
        "stalled": stalled,
        "tokens": wsstack.TOKENS,
        "channel": CHANNEL,
        "mode": mode or "",
        "connect_at": tl["connect_at"],
        "open_rate": open_rate,
        "stalled_subscribe_at": tl["phases"][0][1],
        "phases": tl["phases"],
        "end_at": tl["end_at"],
        "stalled_rcvbuf": 4096,
    }


def _family(proc: psutil.Process) -> list[psutil.Process]:
    """A server and its worker processes (a server with workers forks them)."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _cpu_s(proc: psutil.Process) -> float:
    total = 0.0
    for p in _family(proc):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _rss(proc: psutil.Process) -> int:
    total = 0
    for p in _family(proc):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


async def sample_server(pid: int, tl: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Peak RSS (MB; the server's processes together) in each phase, and the CPU they used per
    second of the phase (1.0 = one core: a server far below that on a busy machine was
    starved, not slow)."""
    rss_mb, cpu = [], []
    proc = psutil.Process(pid)
    for a, b in tl["phases"]:
        await asyncio.sleep(max(0.0, a - time.time()))
        c0 = _cpu_s(proc)
        peak = 0
        while time.time() < b:
            peak = max(peak, _rss(proc))
            await asyncio.sleep(min(0.1, max(0.0, b - time.time())))
        c1 = _cpu_s(proc)
        rss_mb.append(round(peak / 2**20, 1))
        cpu.append(round((c1 - c0) / (b - a), 2))
    return rss_mb, cpu


def side(
    clients: dict[str, Any], sent_per_s: float, rate: int, readers: int,
    server: tuple[list[float], list[float]],
) -> dict[str, Any]:  # fmt: skip
    """One server's figures in today's field names, and what fell short of the offered rate."""
    ph = clients["phases"]
    rss, server_cpu = server
    cores = os.cpu_count() or 1
    p99 = [p["p99_ms"] for p in ph]
    per_token = len(wsstack.TOKENS)
    offered = round(rate * readers / per_token)  # what the readers get at the offered rate
    expected = round(sent_per_s * readers / per_token)  # ... at the rate actually published
    delivered = [p["delivered_per_s"] for p in ph]
    short: list[str] = []
    if sent_per_s < SHORT * rate:
        short.append(f"publisher: {sent_per_s:.0f} ticks/s of {rate} offered")
    for i, p in enumerate(ph):
        # The clients' share of the latency: data waiting in their own socket buffers.
        if p["client_queue_ms"] > max(CLIENT_QUEUE_MS, 0.1 * (p["p50_ms"] or 0)):
            short.append(
                f"clients, phase {i + 1}: data waited {p['client_queue_ms']} ms (mean) in the "
                f"readers' own socket buffers (client cpu {p['client_cpu']})"
            )
    for i, d in enumerate(delivered):
        if d < SHORT * expected:
            short.append(f"server, phase {i + 1}: delivered {d:.0f}/s of {expected} expected")
    load = os.getloadavg()[0]
    if load > MACHINE_LOAD * cores:
        short.append(
            f"machine: load average {load:.1f} on {cores} cores (the server used "
            f"{server_cpu} cores per phase): every process here was starved"
        )
    bound = any(s.startswith(("publisher", "clients", "machine")) for s in short)
    return {
        "delivered_per_s": delivered,
        "offered_per_s": offered,
        "expected_per_s": expected,
        "p50_ms": [p["p50_ms"] for p in ph],
        "p99_ms": p99,
        "p999_ms": [p["p999_ms"] for p in ph],
        "max_ms": [p["max_ms"] for p in ph],
        "p99_ratio": round(p99[1] / p99[0], 2) if p99[0] and p99[1] else None,
        "server_peak_rss_mb": rss,
        "server_cpu": server_cpu,
        "reader_failures": clients["reader_failures"],
        "reader_errors": clients["reader_errors"],
        "readers_subscribed": clients["readers_subscribed"],
        "late_subscribed": clients["late_subscribed"],
        "stalled_connected": clients["stalled_connected"],
        "closed_by_server": clients["closed_by_server"],
        "stalled_errors": clients["stalled_errors"],
        "connect_spread_s": clients["connect_spread_s"],
        "dropped": clients["dropped"],
        "client_cpu": [p["client_cpu"] for p in ph],
        "client_queue_ms": [p["client_queue_ms"] for p in ph],
        "publisher_per_s": sent_per_s,
        # Seven helpers share two cores: the 1-minute load average when the side ended says
        # how much of the machine it had.
        "load_avg_1m": round(load, 1),
        "short_of_offered": short,
        # A figure of the server only when neither the publisher, the clients nor the machine
        # fell short.
        "server_figure": not bound,
    }


async def run_nadi(
    base: Settings, exe: Path, connections: int, stalled: int, rate: int, phase_s: float,
    open_rate: float, mode: str | None, stall_timeout_s: float,
) -> dict[str, Any]:  # fmt: skip
    readers = connections - stalled
    async with wsstack.running_stack(
        base, "ws", ws_stall_timeout_s=stall_timeout_s, ws_max_connections_per_key=connections + 10
    ) as stack:
        tl = timeline(connections, open_rate, phase_s, lead_s=2)
        cfg = client_config(stack.ws_url, "nadi", readers, stalled, open_rate, mode, tl)
        ctx = mp.get_context("spawn")
        pub_out = ctx.Queue()
        producer = wsstack.start_producer(
            stack.settings, rate, tl["phases"][1][1] - tl["t0"] + 0.5, tl["t0"], pub_out
        )
        clients_task = asyncio.create_task(
            asyncio.to_thread(wsload.run, exe, "clients", cfg, tl["end_at"] - time.time() + 120)
        )
        server = await sample_server(stack.api.pid, tl)
        clients = await clients_task
        pub = await asyncio.to_thread(pub_out.get, True, 60)
        await asyncio.to_thread(producer.join, 30)
    out = side(clients, pub["sent_per_s"], rate, readers, server)
    out["publisher"] = {"kind": "python, Kafka", **pub}
    return out


async def run_centrifugo(
    base: Settings, exe: Path, connections: int, stalled: int, rate: int, phase_s: float,
    open_rate: float,
) -> dict[str, Any]:  # fmt: skip
    readers = connections - stalled
    peer = Centrifugo(Paths.from_settings(base), wsstack.free_port())
    version = await asyncio.to_thread(peer.version)
    proc = await asyncio.to_thread(peer.start)
    try:
        tl = timeline(connections, open_rate, phase_s, lead_s=2)
        cfg = client_config(peer.ws_url, "centrifugo", readers, stalled, open_rate, None, tl)
        pub_cfg = {
            "url": peer.batch_url,
            "tokens": wsstack.TOKENS,
            "channel": CHANNEL,
            "rate": rate,
            "start_at": tl["t0"],
            "duration_s": tl["phases"][1][1] - tl["t0"] + 0.5,
        }
        timeout = tl["end_at"] - time.time() + 120
        pub_task = asyncio.create_task(
            asyncio.to_thread(wsload.run, exe, "publish", pub_cfg, timeout)
        )
        clients_task = asyncio.create_task(
            asyncio.to_thread(wsload.run, exe, "clients", cfg, timeout)
        )
        server = await sample_server(proc.pid, tl)
        clients = await clients_task
        pub = await pub_task
    finally:
        await asyncio.to_thread(peer.stop)
    out = side(clients, pub["sent_per_s"], rate, readers, server)
    out["publisher"] = {"kind": "go, HTTP batch API", **pub}
    out["version"] = version
    return out


def acceptance(nadi: dict[str, Any], peer: dict[str, Any] | None) -> dict[str, bool | None]:
    """Issue 12's acceptance, figure by figure (None: not measured in this run)."""
    p99 = nadi["p99_ms"]
    ok_p99 = all(p is not None and p <= 100 for p in p99)
    vs_peer: bool | None = None
    if peer is not None:
        vs_peer = all(
            a is not None and b is not None and a <= 2 * b
            for a, b in zip(p99, peer["p99_ms"], strict=True)
        )
    return {
        "reader_failures_0": nadi["reader_failures"] == 0,
        "p99_le_100ms": ok_p99,
        "p99_le_2x_centrifugo": vs_peer,
        "p99_ratio_le_1.2": nadi["p99_ratio"] is not None and nadi["p99_ratio"] <= 1.2,
        "delivered_ge_0.95_offered": all(
            d >= SHORT * nadi["offered_per_s"] for d in nadi["delivered_per_s"]
        ),
        "rss_le_300mb": all(r <= 300 for r in nadi["server_peak_rss_mb"]),
        "server_figure": nadi["server_figure"],
    }


async def run(
    base: Settings, connections: int, stalled: int, rate: int, phase_s: float,
    open_rate: float, peer: str | None, mode: str | None, stall_timeout_s: float,
) -> dict[str, object]:  # fmt: skip
    exe = await asyncio.to_thread(wsload.binary, base.home)  # no Go: fails here, before anything
    if peer is not None:
        await asyncio.to_thread(Centrifugo(Paths.from_settings(base), 0).install)
    nadi = await run_nadi(
        base, exe, connections, stalled, rate, phase_s, open_rate, mode, stall_timeout_s
    )
    other = None
    if peer == "centrifugo":
        other = await run_centrifugo(base, exe, connections, stalled, rate, phase_s, open_rate)
    return {
        "connections": connections,
        "stalled": stalled,
        "rate": rate,
        "phase_s": phase_s,
        "open_rate": open_rate or "all at once",
        "mode": mode,
        "clients": "native (bench/wsload, Go)",
        **{k: v for k, v in nadi.items() if k != "server_peak_rss_mb"},
        "api_peak_rss_mb": nadi["server_peak_rss_mb"],
        "stall_timeout_s": stall_timeout_s,
        **({"centrifugo": other} if other is not None else {}),
        "acceptance": acceptance(nadi, other),
        "target": "p99 <= 100 ms, with stalled <= 1.2 x without, <= 2 x Centrifugo's; "
        "delivered >= 0.95 x offered; RSS <= 300 MB",
    }


def bench_ws(
    connections: int = typer.Option(1000, min=2, help="WebSocket connections in all"),
    stalled: int = typer.Option(100, min=0, help="of which never read"),
    rate: int = typer.Option(10_000, min=1, help="ticks/s offered (published)"),
    phase: float = typer.Option(20.0, min=1, help="seconds per phase (without, with stalled)"),
    open_rate: float = typer.Option(
        0.0, "--open-rate", min=0, help="connections opened per second (0: all at once)"
    ),
    peer: str | None = typer.Option(
        None, help="also run the same load against a local peer server: centrifugo"
    ),
    mode: str | None = typer.Option(
        None, help="subscribe `mode` passed through to Nadi (e.g. conflate), when the server has it"
    ),
    stall_timeout: float = typer.Option(
        60.0,
        min=0.1,
        help="NADI_WS_STALL_TIMEOUT_S for the API (longer than the phase keeps "
        "the stalled clients connected throughout)",
    ),
) -> None:
    """Others' p99 and server RSS with and without clients that never read; native clients."""
    if peer not in (None, "centrifugo"):
        raise typer.BadParameter("the only peer is centrifugo", param_hint="--peer")
    if stalled >= connections:
        raise typer.BadParameter("fewer stalled than connections", param_hint="--stalled")
    settings = get_settings()
    try:
        result = asyncio.run(
            run(settings, connections, stalled, rate, phase, open_rate, peer, mode, stall_timeout)
        )
    except wsload.GoMissingError as e:
        typer.echo(f"nadi bench ws: {e}", err=True)
        raise typer.Exit(2) from None
    emit(settings, "ws", result)
