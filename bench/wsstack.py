"""Shared plumbing of the WebSocket benchmarks (``latency``, ``ws``): the stack under test
(a processor subprocess and an API subprocess on private topics, database and Redis db), a
paced producer process, WebSocket clients, and latency histograms that merge exactly across
client processes.

Latency is measured from produce to receive: the producer sets ``exchange_ts`` to its wall
clock (``time.time_ns()``) when it hands the tick to the Kafka client, and a client computes
``receive time - exchange_ts`` when the frame holding the tick arrives. Everything runs on
this machine, so both clocks are the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench import common
from nadi.settings import Settings

TOKENS = [738561 + 256 * i for i in range(50)]  # 50 instruments
BUCKET_US = 100  # histogram resolution: 0.1 ms
MAX_BUCKET = 200_000  # 20 s: anything slower lands in the last bucket


class _Msg(msgspec.Struct):
    type: str
    exchange_ts: int | None = None
    offset: str | None = None  # the ring id: Redis's clock (ms) when the processor appended


_decode_frame = msgspec.json.Decoder(list[_Msg] | _Msg).decode


def new_hist() -> list[int]:
    return [0] * (MAX_BUCKET + 1)


def add_latency(hist: list[int], ns: int) -> None:
    hist[min(max(ns, 0) // (BUCKET_US * 1000), MAX_BUCKET)] += 1


def merge(hists: list[list[int]]) -> list[int]:
    out = new_hist()
    for h in hists:
        for i, c in enumerate(h):
            if c:
                out[i] += c
    return out


def percentile_ms(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms, at 0.1 ms resolution (upper edge of the bucket)."""
    total = sum(hist)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(hist):
        seen += c
        if seen >= rank:
            return round((i + 1) * BUCKET_US / 1000, 1)
    return None


def record_frame(
    hist: list[int], data: str | bytes, now_ns: int, to_ring: list[int] | None = None
) -> int:
    """Add the latency of every tick in a frame; returns how many ticks it held. ``to_ring``
    gets the produce -> ring-append part (the offset's ms, so 1 ms resolution)."""
    decoded = _decode_frame(data)
    msgs = decoded if isinstance(decoded, list) else [decoded]
    n = 0
    for m in msgs:
        if m.type == "tick" and m.exchange_ts is not None:
            add_latency(hist, now_ns - m.exchange_ts)
            if to_ring is not None and m.offset:
                add_latency(to_ring, int(m.offset.partition("-")[0]) * 1_000_000 - m.exchange_ts)
            n += 1
    return n


# ---- the paced producer (its own process, so the GIL never delays a client) --------------------


def produce_paced(
    bootstrap: str, topic: str, rate: int, duration_s: float, start_at: float, out: Any = None
) -> None:
    """``rate`` ticks/s over TOKENS for ``duration_s`` from wall time ``start_at``, in 5 ms
    slots; exchange_ts = the wall clock at produce time (ns). ``out`` (a queue) gets what was
    reached: ``sent``, ``sent_per_s`` and ``late_slots`` (slots that overran by a whole slot),
    so a bench can tell a publisher that fell short from a server that did."""
    from confluent_kafka import Producer

    from nadi.codec import encode
    from nadi.tick import Tick

    p = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all", "enable.idempotence": True,
         "queue.buffering.max.messages": 1_000_000}
    )  # fmt: skip
    seq = dict.fromkeys(TOKENS, 0)
    price = {t: 100.0 + (t % 997) for t in TOKENS}
    slot = 0.005
    per_slot = rate * slot
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    sent = 0
    i = 0
    late = 0
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= duration_s:
            break
        due = int((elapsed + slot) * rate)  # ticks that should be out by the end of this slot
        while sent < due:
            tok = TOKENS[i % len(TOKENS)]
            i += 1
            seq[tok] += 1
            price[tok] = round(price[tok] + (0.05 if (i * 7919) % 3 else -0.05), 2)
            t = Tick(tok, seq[tok], time.time_ns(), max(price[tok], 1.0), "NSE", 1, seq[tok], None,
                     None, None, None, None, "A")  # fmt: skip
            p.produce(topic, encode(t), str(tok).encode())
            sent += 1
        p.poll(0)
        wait = t0 + (int(elapsed / slot) + 1) * slot - time.monotonic()
        late += wait < -slot
        time.sleep(max(0.0, wait))
    del per_slot
    elapsed = time.monotonic() - t0
    p.flush(30)
    if out is not None:
        out.put({"sent": sent, "sent_per_s": round(sent / elapsed), "late_slots": late})


def start_producer(
    s: Settings, rate: int, duration_s: float, start_at: float, out: Any = None
) -> Any:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=produce_paced,
        args=(s.kafka_bootstrap, s.topic_ticks, rate, duration_s, start_at, out),
    )
    proc.start()
    return proc


# ---- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    settings: Settings
    port: int
    worker: Any  # subprocess.Popen
    api: Any

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running_stack(base: Settings, name: str, **overrides: Any) -> AsyncIterator[Stack]:
    """Private database/topics, one processor and one API (``nadi api``) subprocess."""
    s = common.bench_settings(base, name).model_copy(update=overrides)
    await common.fresh_database(s)
    await common.create_topics(s, (s.topic_ticks, 12), (s.topic_dlq, 1))
    port = free_port()
    logs = s.home / "bench"
    env = {
        **common.worker_env(s),
        "NADI_RING_MAXLEN": str(s.ring_maxlen),
        "NADI_WS_QUEUE_SIZE": str(s.ws_queue_size),
        "NADI_WS_STALL_TIMEOUT_S": str(s.ws_stall_timeout_s),
    }
    env.pop("NADI_API_KEYS", None)
    worker = common.spawn(["process"], env, Path(logs / f"{name}-worker.log"))
    api = common.spawn(["api", "--port", str(port)], env, Path(logs / f"{name}-api.log"))
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                for p in (worker, api):
                    if p.poll() is not None:
                        raise RuntimeError(f"a {name} subprocess exited; see {logs}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the API did not start; see {logs}/{name}-api.log")
        await asyncio.sleep(3)  # the worker joins its group
        yield Stack(s, port, worker, api)
    finally:
        for p in (api, worker):
            p.terminate()
        for p in (api, worker):
            try:
                p.wait(30)
            except Exception:
                p.kill()
        await common.delete_topics(s, s.topic_ticks, s.topic_dlq)


async def subscribe(ws: Any, tokens: list[int]) -> None:
    """Subscribe live and wait for every ``synced``."""
    await ws.send(msgspec.json.encode({"op": "subscribe", "instruments": tokens}).decode())
    pending = set(tokens)
    while pending:
        data = msgspec.json.decode(await ws.recv())
        for m in data if isinstance(data, list) else [data]:
            if m.get("type") == "synced":
                pending.discard(m["instrument_token"])
            elif m.get("type") == "error":
                raise RuntimeError(f"subscribe failed: {m}")
