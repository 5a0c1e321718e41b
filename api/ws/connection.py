"""One WebSocket client: its bounded outbound queue, its writer task and its subscriptions.

Back-pressure policy (DESIGN.md section 7). Live ticks are pushed without ever waiting: when the
queue (``ws_queue_size`` messages) is full the *oldest* message is evicted and counted, and the
writer sends ``{"type":"dropped","count":n}`` ahead of what is still queued, so the client knows
exactly where the hole is. Catch-up (which pulls from the ring or the database at its own pace)
instead waits for room, so a slow client slows its own catch-up rather than losing it.

Frames: the writer takes everything queued (up to :data:`MAX_PER_FRAME` messages) and sends it
as one frame, a JSON array when there is more than one message (see ``protocol.frame``). A client
that keeps up gets about one frame per processor batch; a client that is behind gets fewer,
bigger frames, which is what lets it catch up.

Stall: a client whose single pending send has been blocked for ``ws_stall_timeout_s`` (the TCP
buffers are full: it does not read) while its queue is full is closed with code 4008. The hub's
watchdog checks this; the writer never blocks anyone but itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

from api.ws import protocol

MAX_PER_FRAME = 500  # messages per frame: bounds frame size (~150 KB) and per-send latency
CLOSE_STALLED = 4008

SendFn = Callable[[str], Awaitable[None]]  # sends one text frame


class Subscription:
    """A connection's interest in one instrument. While ``live`` is False a catch-up is running
    and live ticks are parked in ``buffer`` (bounded: on overflow it is emptied and
    ``overflow`` set, and the catch-up re-reads the ring instead, which holds all of them)."""

    __slots__ = ("buffer", "buffer_cap", "conn", "live", "overflow", "task", "token")

    def __init__(self, conn: Connection, token: int, buffer_cap: int) -> None:
        self.conn = conn
        self.token = token
        self.live = False
        self.buffer: list[tuple[tuple[int, int], bytes]] = []
        self.buffer_cap = buffer_cap
        self.overflow = False
        self.task: asyncio.Task[None] | None = None

    def deliver(self, offset: tuple[int, int], message: bytes) -> None:
        """Called by the hub for each live tick of ``token`` (never blocks)."""
        if self.live:
            self.conn.push(message)
        elif len(self.buffer) < self.buffer_cap:
            self.buffer.append((offset, message))
        else:
            self.buffer.clear()
            self.overflow = True


class Connection:
    """Outbound side of one client. The owner (the router) starts :meth:`run_writer` as a task
    and cancels it on close; ``closing`` is set when the connection must end (stall, writer
    failure) and ``close_code`` says how."""

    def __init__(self, send: SendFn, *, queue_size: int, key: str | None) -> None:
        self._send = send
        self.key = key
        self.queue: deque[bytes] = deque()
        self.queue_size = queue_size
        self.dropped = 0  # evicted since the last ``dropped`` notice
        self.dropped_total = 0
        self.sent_messages = 0
        self.subs: dict[int, Subscription] = {}
        self.closing = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._sending_since: float | None = None  # time.monotonic() when the pending send began

    # ---- producers ---------------------------------------------------------------------------

    def push(self, message: bytes) -> None:
        """Queue a message now; on overflow evict the oldest (counted for ``dropped``)."""
        q = self.queue
        if len(q) >= self.queue_size:
            q.popleft()
            self.dropped += 1
            self.dropped_total += 1
        q.append(message)
        self._wake.set()

    async def put(self, message: bytes) -> None:
        """Queue a message, waiting for room first (catch-up: never evicts to make room)."""
        while len(self.queue) >= self.queue_size:
            self._room.clear()
            await self._room.wait()
        self.push(message)

    # ---- health ----------------------------------------------------------------------------

    def stalled_for(self, now: float) -> float:
        """Seconds the pending send has been blocked while the queue is full (0 if not)."""
        if self._sending_since is None or len(self.queue) < self.queue_size:
            return 0.0
        return now - self._sending_since

    def close(self, code: int, reason: str) -> None:
        """Ask the owner to end the connection with ``code``."""
        if not self.closing.is_set():
            self.close_code, self.close_reason = code, reason
            self.closing.set()

    # ---- the writer task -------------------------------------------------------------------

    async def run_writer(self) -> None:
        """Send queued messages until cancelled; a failed send ends the connection."""
        q = self.queue
        try:
            while True:
                if not q and not self.dropped:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch: list[bytes] = []
                if self.dropped:
                    batch.append(protocol.dropped(self.dropped))
                    self.dropped = 0
                for _ in range(min(len(q), MAX_PER_FRAME)):
                    batch.append(q.popleft())
                self._room.set()
                self._sending_since = time.monotonic()
                await self._send(protocol.frame(batch))
                self._sending_since = None
                self.sent_messages += len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away mid-send
            self.close(1011 if not self.closing.is_set() else self.close_code, type(e).__name__)
