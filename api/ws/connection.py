"""One WebSocket client: its outbound lanes, its writer task and its subscriptions.

Outbound lanes (DESIGN.md section 7). Everything queued gets a serial number, and the writer
sends in serial order across the lanes, so what is queued first goes out first:

* the **live lane** holds live ticks as :class:`Chunk` s: the hub builds, per dispatch round and
  instrument, one chunk of that instrument's tick messages, already joined into the bytes of a
  frame, and hands the *same* chunk to every subscriber (issue 12: the fan-out costs one append
  per connection and round, not one per tick, and the bytes are made once). The lane holds at
  most ``ws_queue_size`` messages; on overflow, per subscription mode:

  - default (exact stream): the *oldest* messages are evicted (a chunk is cut where needed) and
    counted, and the writer sends ``{"type":"dropped","count":n}`` ahead of what is still queued,
    so the client knows where the hole is;
  - ``"mode":"conflate"``: the connection is *behind*; its queued ticks of that instrument are
    folded into the newest one, and until it has caught up (live lane below ``low_water``) each
    new chunk only replaces that newest tick. The writer sends
    ``{"type":"conflated","instrument_token":t,"skipped":n}`` right before it: a screen that fell
    behind jumps to the current price.

  Only a client that does not keep up loses or skips live ticks.
* the **reliable lane** holds catch-up history, ``synced``, ``error`` and ``pong``: nothing in
  it is ever evicted. It is filled only as the client reads: catch-up reads its next page only
  when the lane is down to :attr:`Connection.low_water` (``ws_queue_size // 2``) messages, one
  page at a time per connection (:attr:`Connection.history_gate`), and the router stops reading
  client messages while the lane is full. So it stays below ``ws_queue_size`` plus one page
  (plus one ``synced`` per subscription), and a client that reads gets all of its history.

Cost of a stalled client to the dispatcher: one append (and, once full, one eviction or one
dict store) per round and instrument, whatever the tick rate; its writer waits on the socket
and costs nothing; nothing is serialised for it. The watchdog closes it after the stall timeout.

Frames: the writer takes what is queued, up to ``ws_max_frame_bytes``, and sends it as one frame,
a JSON array when there is more than one message (see ``protocol.frame``). A client that keeps
up gets about one frame per dispatch round; one that is behind gets fewer, bigger frames.

Stall: a client whose pending send has been blocked for ``ws_stall_timeout_s`` (its TCP buffers
are full: it does not read) while a lane is full is closed with code 4008. The hub's watchdog
checks this; the writer never blocks anyone but itself.

Ownership: the router's session starts :meth:`Connection.run_writer` as a task and cancels it;
a :class:`Subscription`'s catch-up task is owned by the session too (``Subscription.task``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from api.ws import protocol
from api.ws.metrics import WS_CONFLATED, WS_DROPPED

CLOSE_STALLED = 4008

SendFn = Callable[[str], Awaitable[None]]  # sends one text frame
Offset = tuple[int, int]  # a ring offset as a comparable pair


class Chunk:
    """Consecutive live tick messages of one instrument (ring offsets increasing), shared by
    every subscriber of it; ``data`` is ``msgs`` joined with commas (part of a JSON array)."""

    __slots__ = ("data", "first", "last", "msgs", "offsets", "token")

    def __init__(self, token: int, offsets: list[Offset], msgs: list[bytes]) -> None:
        self.token = token
        self.offsets = offsets
        self.msgs = msgs
        self.data = b",".join(msgs)
        self.first = offsets[0]
        self.last = offsets[-1]

    @classmethod
    def one(cls, token: int, offset: Offset, message: bytes) -> Chunk:
        return cls(token, [offset], [message])


LiveItem = tuple[int, Chunk, int]  # (serial, chunk, index of its first message still queued)
Reliable = deque[tuple[int, bytes]]  # (serial, message)


class Subscription:
    """A connection's interest in one instrument. While ``live`` is False a catch-up is running
    and live ticks are parked in ``buffer`` (bounded: on overflow it is emptied and
    ``overflow`` set, and the catch-up re-reads the ring instead, which holds all of them).
    Once live, a tick at or below ``floor`` (the last ring offset the catch-up sent) is one the
    catch-up read from the ring before the hub dispatched it, and is not sent again.
    ``conflate``: the subscribe message asked for ``"mode":"conflate"``."""

    __slots__ = (
        "buffer", "buffer_cap", "conflate", "conn", "floor", "live", "overflow", "task", "token",
    )  # fmt: skip

    def __init__(
        self, conn: Connection, token: int, buffer_cap: int, conflate: bool = False
    ) -> None:
        self.conn = conn
        self.token = token
        self.conflate = conflate
        self.live = False
        self.floor: Offset = (-1, -1)
        self.buffer: list[tuple[Offset, bytes]] = []
        self.buffer_cap = buffer_cap
        self.overflow = False
        self.task: asyncio.Task[None] | None = None

    def deliver(self, chunk: Chunk) -> None:
        """Called by the hub for each chunk of ``token`` (never blocks)."""
        if self.live:
            if chunk.first > self.floor:
                self.conn.push(chunk, 0, self.conflate)
            elif chunk.last > self.floor:  # just after the switch: skip what catch-up sent
                start = bisect.bisect_right(chunk.offsets, self.floor)
                self.conn.push(chunk, start, self.conflate)
        elif len(self.buffer) + len(chunk.msgs) <= self.buffer_cap:
            self.buffer.extend(zip(chunk.offsets, chunk.msgs, strict=True))
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
        self.live: deque[LiveItem] = deque()
        self.live_count = 0  # messages in the live lane
        self.reliable: Reliable = deque()
        # Conflating instruments while behind: token -> (serial, newest tick message), and how
        # many ticks of it were skipped since the last ``conflated`` notice.
        self.latest: dict[int, tuple[int, bytes]] = {}
        self.skipped: dict[int, int] = {}
        self._spill: deque[tuple[int, bytes, int]] = deque()  # (serial, bytes, messages)
        self.behind = False
        self.queue_size = queue_size
        self.low_water = queue_size // 2
        self.max_frame_bytes = max_frame_bytes
        self.history_gate = asyncio.Lock()  # one catch-up page at a time (FIFO across subs)
        self.dropped = 0  # evicted since the last ``dropped`` notice
        self.dropped_total = 0
        self.skipped_total = 0
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

    def push(self, chunk: Chunk, start: int = 0, conflate: bool = False) -> None:
        """Queue live messages ``chunk.msgs[start:]`` now; never waits (see the module doc)."""
        if conflate and self.behind:
            self._fold(next(self._serial), chunk, start)
        else:
            self.live.append((next(self._serial), chunk, start))
            self.live_count += len(chunk.msgs) - start
            if self.live_count > self.queue_size:
                self._overflow()
        self._wake.set()

    def _fold(self, serial: int, chunk: Chunk, start: int) -> None:
        token = chunk.token
        n = len(chunk.msgs) - start
        skipped = n - 1 + (1 if token in self.latest else 0)
        if skipped:
            self.skipped[token] = self.skipped.get(token, 0) + skipped
            self.skipped_total += skipped
            WS_CONFLATED.inc(skipped)
        self.latest[token] = (serial, chunk.msgs[-1])

    def _overflow(self) -> None:
        if not self.behind and any(s.conflate for s in self.subs.values()):
            # Behind: fold the conflating instruments' queued ticks into their newest.
            self.behind = True
            conflating = {t for t, s in self.subs.items() if s.conflate}
            kept: deque[LiveItem] = deque()
            count = 0
            for item in self.live:
                serial, chunk, start = item
                if chunk.token in conflating:
                    self._fold(serial, chunk, start)
                else:
                    kept.append(item)
                    count += len(chunk.msgs) - start
            self.live, self.live_count = kept, count
        live = self.live
        while self.live_count > self.queue_size:  # drop-oldest (exact-stream subscriptions)
            serial, chunk, start = live[0]
            excess = self.live_count - self.queue_size
            n = len(chunk.msgs) - start
            if n <= excess:
                live.popleft()
            else:
                live[0] = (serial, chunk, start + excess)
                n = excess
            self.live_count -= n
            self.dropped += n
            self.dropped_total += n
            WS_DROPPED.inc(n)

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
        return self.live_count + len(self.reliable) + len(self.latest) + len(self._spill)

    def stalled_for(self, now: float) -> float:
        """Seconds the pending send has been blocked while a lane is full (0 if not)."""
        if self._sending_since is None or (
            self.live_count < self.queue_size
            and not self.behind
            and len(self.reliable) < self.low_water
        ):
            return 0.0
        return now - self._sending_since

    def close(self, code: int, reason: str) -> None:
        """Ask the owner to end the connection with ``code``."""
        if not self.closing.is_set():
            self.close_code, self.close_reason = code, reason
            self.closing.set()

    # ---- the writer task -------------------------------------------------------------------

    def _take_latest(self) -> None:
        """Move the conflated instruments' newest ticks (with their notices) to ``_spill``, in
        serial order; the writer sends them from there (a frame may not hold all of them)."""
        for token, (serial, message) in sorted(self.latest.items(), key=lambda kv: kv[1][0]):
            skipped = self.skipped.pop(token, 0)
            if skipped:
                self._spill.append((serial, protocol.conflated(token, skipped) + b"," + message, 2))
            else:
                self._spill.append((serial, message, 1))
        self.latest.clear()

    def _next_frame(self) -> tuple[list[bytes], int]:
        """Parts (comma-joinable) of one frame in serial order, at most ``max_frame_bytes`` (or
        one item), and how many messages they hold."""
        parts: list[bytes] = []
        n = 0
        size = 1  # the array's brackets and commas: one byte per part, plus one
        if self.dropped:
            parts.append(protocol.dropped(self.dropped))
            size += len(parts[0]) + 1
            n += 1
            self.dropped = 0
        if self.latest:
            self._take_latest()
        latest = self._spill
        live, reliable, cap = self.live, self.reliable, self.max_frame_bytes
        while live or reliable or latest:
            # The lane whose head was queued first.
            best, which = -1, 0
            if reliable:
                best, which = reliable[0][0], 1
            if live and (which == 0 or live[0][0] < best):
                best, which = live[0][0], 2
            if latest and (which == 0 or latest[0][0] < best):
                which = 3
            if which == 2:
                _, chunk, start = live[0]
                data = chunk.data if start == 0 else b",".join(chunk.msgs[start:])
                if parts and size + len(data) + 1 > cap:
                    break
                live.popleft()
                k = len(chunk.msgs) - start
                self.live_count -= k
                n += k
            elif which == 1:
                data = reliable[0][1]
                if parts and size + len(data) + 1 > cap:
                    break
                reliable.popleft()
                n += 1
            else:
                data = latest[0][1]
                if parts and size + len(data) + 1 > cap:
                    break
                n += latest.popleft()[2]
            parts.append(data)
            size += len(data) + 1
        if self.behind and not latest and self.live_count < self.low_water:
            self.behind = False  # caught up: conflating instruments queue every tick again
        return parts, n

    async def run_writer(self) -> None:
        """Send queued messages until cancelled; a failed send ends the connection."""
        try:
            while True:
                if not (self.live or self.reliable or self.dropped or self.latest or self._spill):
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                parts, n = self._next_frame()
                self._room.set()
                self._sending_since = time.monotonic()
                await self._send(protocol.frame(parts, n))
                self._sending_since = None
                self.sent_messages += n
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away mid-send
            self.close(1011 if not self.closing.is_set() else self.close_code, type(e).__name__)
