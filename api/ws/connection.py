"""One WebSocket client: its two outbound lanes, its writer task and its subscriptions.

Outbound lanes (DESIGN.md section 7). Every message gets a serial number when queued, and the
writer sends in serial order across both lanes, so what is queued first goes out first:

* the **live lane** (``ws_queue_size`` messages) holds live ticks. They are pushed without ever
  waiting; when the lane is full its *oldest* message is evicted and counted, and the writer
  sends ``{"type":"dropped","count":n}`` ahead of what is still queued, so the client knows
  where the hole is. Only a client that does not keep up loses live ticks.
* the **reliable lane** holds catch-up history, ``synced``, ``error`` and ``pong``: nothing in
  it is ever evicted. It is filled only as the client reads: catch-up reads its next page only
  when the lane is down to :attr:`Connection.low_water` (``ws_queue_size // 2``) messages, one
  page at a time per connection (:attr:`Connection.history_gate`), and the router stops reading
  client messages while the lane is full. So it stays below ``ws_queue_size`` plus one page
  (plus one ``synced`` per subscription), and a client that reads gets all of its history.

Frames: the writer takes what is queued, up to ``ws_max_frame_bytes``, and sends it as one frame,
a JSON array when there is more than one message (see ``protocol.frame``). A client that keeps
up gets about one frame per processor batch; one that is behind gets fewer, bigger frames.

Stall: a client whose pending send has been blocked for ``ws_stall_timeout_s`` (its TCP buffers
are full: it does not read) while a lane is full is closed with code 4008. The hub's watchdog
checks this; the writer never blocks anyone but itself.

Ownership: the router's session starts :meth:`Connection.run_writer` as a task and cancels it;
a :class:`Subscription`'s catch-up task is owned by the session too (``Subscription.task``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from api.ws import protocol

CLOSE_STALLED = 4008

SendFn = Callable[[str], Awaitable[None]]  # sends one text frame
Lane = deque[tuple[int, bytes]]  # (serial, message)


class Subscription:
    """A connection's interest in one instrument. While ``live`` is False a catch-up is running
    and live ticks are parked in ``buffer`` (bounded: on overflow it is emptied and
    ``overflow`` set, and the catch-up re-reads the ring instead, which holds all of them).
    Once live, a tick at or below ``floor`` (the last ring offset the catch-up sent) is one the
    catch-up read from the ring before the hub dispatched it, and is not sent again."""

    __slots__ = ("buffer", "buffer_cap", "conn", "floor", "live", "overflow", "task", "token")

    def __init__(self, conn: Connection, token: int, buffer_cap: int) -> None:
        self.conn = conn
        self.token = token
        self.live = False
        self.floor = (-1, -1)
        self.buffer: list[tuple[tuple[int, int], bytes]] = []
        self.buffer_cap = buffer_cap
        self.overflow = False
        self.task: asyncio.Task[None] | None = None

    def deliver(self, offset: tuple[int, int], message: bytes) -> None:
        """Called by the hub for each live tick of ``token`` (never blocks)."""
        if self.live:
            if offset > self.floor:
                self.conn.push(message)
        elif len(self.buffer) < self.buffer_cap:
            self.buffer.append((offset, message))
        else:
            self.buffer.clear()
            self.overflow = True


class Connection:
    """Outbound side of one client. The owner (the router) starts :meth:`run_writer` as a task
    and cancels it on close; ``closing`` is set when the connection must end (stall, writer
    failure) and ``close_code`` says how. ``key`` is the per-key limit's label (the key id)."""

    def __init__(
        self, send: SendFn, *, queue_size: int, key: str | None, max_frame_bytes: int = 262_144
    ) -> None:
        self._send = send
        self.key = key
        self.live: Lane = deque()
        self.reliable: Lane = deque()
        self.queue_size = queue_size
        self.low_water = queue_size // 2
        self.max_frame_bytes = max_frame_bytes
        self.history_gate = asyncio.Lock()  # one catch-up page at a time (FIFO across subs)
        self.dropped = 0  # evicted since the last ``dropped`` notice
        self.dropped_total = 0
        self.sent_messages = 0
        self.subs: dict[int, Subscription] = {}
        self.closing = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""
        self._serial = itertools.count()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._sending_since: float | None = None  # time.monotonic() when the pending send began

    # ---- producers ---------------------------------------------------------------------------

    def push(self, message: bytes) -> None:
        """Queue a live message now; on overflow evict the oldest live one (counted)."""
        lane = self.live
        if len(lane) >= self.queue_size:
            lane.popleft()
            self.dropped += 1
            self.dropped_total += 1
        lane.append((next(self._serial), message))
        self._wake.set()

    def put_now(self, message: bytes) -> None:
        """Queue a message that must not be lost (``synced``, ``error``, ``pong``)."""
        self.reliable.append((next(self._serial), message))
        self._wake.set()

    def put_history(self, messages: Iterable[bytes]) -> None:
        """Queue a catch-up page (the caller waited for :meth:`wait_history_room`)."""
        serial = self._serial
        self.reliable.extend((next(serial), m) for m in messages)
        self._wake.set()

    async def wait_room(self, level: int | None = None) -> None:
        """Wait until the reliable lane holds at most ``level`` messages (default: below
        ``queue_size``, i.e. room for one more)."""
        limit = self.queue_size - 1 if level is None else level
        while len(self.reliable) > limit:
            self._room.clear()
            await self._room.wait()

    async def wait_history_room(self) -> None:
        """Wait until the client has read the reliable lane down to ``low_water``."""
        await self.wait_room(self.low_water)

    # ---- health ----------------------------------------------------------------------------

    def queued(self) -> int:
        return len(self.live) + len(self.reliable)

    def stalled_for(self, now: float) -> float:
        """Seconds the pending send has been blocked while a lane is full (0 if not)."""
        if self._sending_since is None or (
            len(self.live) < self.queue_size and len(self.reliable) < self.low_water
        ):
            return 0.0
        return now - self._sending_since

    def close(self, code: int, reason: str) -> None:
        """Ask the owner to end the connection with ``code``."""
        if not self.closing.is_set():
            self.close_code, self.close_reason = code, reason
            self.closing.set()

    # ---- the writer task -------------------------------------------------------------------

    def _next_frame(self) -> list[bytes]:
        """Messages for one frame in serial order, at most ``max_frame_bytes`` (or one)."""
        batch: list[bytes] = []
        size = 1  # the array's brackets and commas: one byte per message, plus one
        if self.dropped:
            batch.append(protocol.dropped(self.dropped))
            size += len(batch[0]) + 1
            self.dropped = 0
        live, reliable, cap = self.live, self.reliable, self.max_frame_bytes
        while live or reliable:
            lane = reliable if reliable and (not live or reliable[0][0] < live[0][0]) else live
            message = lane[0][1]
            if batch and size + len(message) + 1 > cap:
                break
            lane.popleft()
            batch.append(message)
            size += len(message) + 1
        return batch

    async def run_writer(self) -> None:
        """Send queued messages until cancelled; a failed send ends the connection."""
        try:
            while True:
                if not self.live and not self.reliable and not self.dropped:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._next_frame()
                self._room.set()
                self._sending_since = time.monotonic()
                await self._send(protocol.frame(batch))
                self._sending_since = None
                self.sent_messages += len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away mid-send
            self.close(1011 if not self.closing.is_set() else self.close_code, type(e).__name__)
