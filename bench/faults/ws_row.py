"""The API row: ``nadi api`` SIGKILLed while 200 WebSocket clients are subscribed under a live
stream, then restarted; each client reconnects with ``since`` = the last ring offset it saw.

Client ``i`` subscribes to one instrument (round-robin) live-only and records every tick's
ring offset. After the group has caught up and every client has reached its ring's last
entry, a client's offsets must be exactly its ring's entry ids after its first ``synced``
offset, in ring order: ``ws_holes`` counts ring entries a client never got,
``ws_duplicates`` ticks it got twice, ``ws_extra`` offsets that are not in the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from bench.faults.engine import Row, Run, nadi_script, ring_names, service_env, wait_until
from bench.faults.stream import TOKENS

CLIENTS = 200


@dataclass
class Client:
    token: int
    start: str | None = None  # the first synced offset: the client gets every entry after it
    last: str | None = None  # the last offset seen (tick or synced)
    offsets: list[str] = field(default_factory=list)
    dropped: int = 0
    connects: int = 0
    resubscribed_at: float | None = None  # monotonic time of the synced after a reconnect
    errors: list[str] = field(default_factory=list)


def _offset_key(o: str) -> tuple[int, int]:
    ms, _, n = o.partition("-")
    return int(ms), int(n)


class ApiRow:
    """State of one run of the row (a fresh one per run)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.port = run.stack.ports.api
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.clients = [Client(TOKENS[i % len(TOKENS)]) for i in range(CLIENTS)]
        self.tasks: list[asyncio.Task[None]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.killed_at: float | None = None
        self.rng = random.Random(3)

    async def start_api(self) -> None:
        env = service_env(self.run.ws)
        env.update({"NADI_API_PORT": str(self.port), "NADI_WS_QUEUE_SIZE": "100000"})
        log = (self.run.dir / "api.log").open("ab")
        self.api = subprocess.Popen(
            [nadi_script(), "api", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        async def ready() -> bool:
            assert self.api is not None
            if self.api.poll() is not None:
                raise AssertionError(f"nadi api exited with {self.api.returncode}")
            try:
                async with httpx.AsyncClient() as http:
                    r = await http.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(ready, 60, "nadi api to be ready")

    async def _client(self, c: Client) -> None:
        while not self.stopping:
            try:
                async with connect(self.url, open_timeout=10, compression=None, proxy=None) as ws:
                    c.connects += 1
                    sub: dict[str, Any] = {"op": "subscribe", "instruments": [c.token]}
                    if c.last is not None:
                        sub["since"] = c.last
                    await ws.send(json.dumps(sub))
                    async for frame in ws:
                        data = json.loads(frame)
                        for m in data if isinstance(data, list) else [data]:
                            self._on_message(c, m)
            except (TimeoutError, OSError, WebSocketException):
                pass  # the API is down: connect again
            if not self.stopping:
                # A client's reconnect back-off with jitter (what real clients do), not
                # synchronisation.
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))

    def _on_message(self, c: Client, m: dict[str, Any]) -> None:
        kind = m.get("type")
        if kind == "tick":
            if m.get("offset") is None:
                c.errors.append("tick without a ring offset")
                return
            c.offsets.append(m["offset"])
            c.last = m["offset"]
        elif kind == "synced":
            if c.start is None:
                c.start = m["offset"] or "0-0"
            if c.last is None:
                c.last = c.start
            if c.connects > 1 and c.resubscribed_at is None:
                c.resubscribed_at = time.monotonic()
        elif kind == "dropped":
            c.dropped += int(m["count"])
        elif kind == "error":
            c.errors.append(f"{m.get('code')}: {m.get('message')}")

    async def fault(self, run: Run) -> None:
        await run.producer.reached(0.05)
        await self.start_api()
        for i in range(0, len(self.clients), 20):  # subscribers arrive 20 at a time
            group = self.clients[i : i + 20]
            self.tasks += [asyncio.create_task(self._client(c)) for c in group]
            await wait_until(
                lambda g=group: all(c.start is not None for c in g),  # type: ignore[misc]
                60,
                f"clients {i}..{i + 19} synced",
            )
        await run.producer.reached(0.4)
        assert self.api is not None
        self.api.send_signal(signal.SIGKILL)
        self.api.wait(30)
        self.killed_at = time.monotonic()
        await self.start_api()
        await wait_until(
            lambda: all(c.resubscribed_at is not None for c in self.clients),
            60,
            "every client resubscribed with since",
        )
        run.end_fault()

    async def finish(self, run: Run) -> None:
        """After the group caught up: every client reaches its ring's end, then compare."""
        ring_key = await ring_names(run.s)
        r = aioredis.from_url(run.s.redis_url)
        try:
            rings: dict[int, list[str]] = {}
            for token in set(c.token for c in self.clients):
                entries: Any = await r.xrange(ring_key(token))
                rings[token] = [e[0].decode() for e in entries]
        finally:
            await r.aclose()

        def reached() -> bool:
            return all(not rings[c.token] or c.last == rings[c.token][-1] for c in self.clients)

        try:
            await wait_until(reached, 60, "every client to reach its ring's last entry")
        except AssertionError as e:
            run.problems.append(str(e))
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.api is not None and self.api.poll() is None:
            self.api.send_signal(signal.SIGTERM)
            try:
                self.api.wait(30)
            except subprocess.TimeoutExpired:
                self.api.kill()
        holes = dups = extra = dropped = 0
        errors: list[str] = []
        for c in self.clients:
            ring = rings[c.token]
            start = _offset_key(c.start or "0-0")
            want = [o for o in ring if _offset_key(o) > start]
            got = set(c.offsets)
            holes += len(set(want) - got)
            dups += len(c.offsets) - len(got)
            extra += len(got - set(ring))
            dropped += c.dropped
            errors += c.errors
        killed = self.killed_at or 0.0
        reconnect = [c.resubscribed_at - killed for c in self.clients if c.resubscribed_at]
        run.notes.update(
            {
                "ws_clients": len(self.clients),
                "ws_ticks_received": sum(len(c.offsets) for c in self.clients),
                "ws_holes": holes,
                "ws_duplicates": dups,
                "ws_extra": extra,
                "ws_dropped": dropped,
                "ws_reconnect_max_s": round(max(reconnect), 2) if reconnect else None,
            }
        )
        for k in ("ws_holes", "ws_duplicates", "ws_extra", "ws_dropped"):
            if run.notes[k]:
                run.problems.append(f"{k} = {run.notes[k]}")
        if errors:
            run.problems.append(f"ws errors: {errors[:5]}")


def api_row() -> Row:
    async def fault(run: Run) -> None:
        row = ApiRow(run)
        run.state["api_row"] = row
        await row.fault(run)

    async def after(run: Run) -> None:
        row = run.state.get("api_row")
        if isinstance(row, ApiRow):
            await row.finish(run)

    return Row("api_sigkill_ws_clients", fault, workers=2, stream_s=16.0, after=after)
