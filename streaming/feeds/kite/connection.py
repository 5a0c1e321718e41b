"""One ticker WebSocket: connect, subscribe, read, and reconnect for ever.

Ownership: :meth:`KiteConnection.run` is one task (the feed's TaskGroup owns it) and is ended
only by cancellation; it awaits the frame handler before reading the next frame, so a slow
sink slows the reads (the server's buffer, then TCP, hold the rest) instead of queueing
without bound. A drop (close, error, or the heartbeat watchdog finding the connection silent
for ``heartbeat_timeout_s``) opens an outage row from the last frame received; the next
successful subscribe closes it, counts the reconnect and logs it. Between attempts the wait
doubles from ``reconnect_initial_delay_s`` up to ``reconnect_max_delay_s``, with jitter so
three connections of one key do not retry in step.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from nadi.times import to_epoch_ns
from streaming.feeds.kite import metrics
from streaming.feeds.kite.config import KiteFeedConfig
from streaming.feeds.kite.protocol import mode_message, subscribe_message
from streaming.feeds.kite.state import FeedState

BinaryHandler = Callable[[int, bytes, int], Awaitable[None]]  # (connection, frame, received ns)
TextHandler = Callable[[int, str], None]

log = structlog.get_logger("nadi.feeds.kite")


class HandlerFailed(Exception):
    """A frame could not be handled (sink or database down): ends the feed."""


def backoff_s(attempt: int, initial: float, cap: float) -> float:
    """Wait before reconnect attempt ``attempt`` (0-based): exponential, capped, jittered
    into [50%, 100%] of the step."""
    step: float = min(cap, initial * 2.0 ** min(attempt, 30))
    return step * random.uniform(0.5, 1.0)


class KiteConnection:
    """Connection ``index`` of a feed, carrying ``tokens``."""

    def __init__(
        self,
        index: int,
        tokens: tuple[int, ...],
        config: KiteFeedConfig,
        state: FeedState,
        on_binary: BinaryHandler,
        on_text: TextHandler,
        resumed_after: datetime | None = None,
    ) -> None:
        self.index = index
        self.tokens = tokens
        self.config = config
        self.state = state
        self.on_binary = on_binary
        self.on_text = on_text
        # When a previous run of the adapter last produced for these tokens today: the time
        # from then to this run's first subscribe is an outage too (reason adapter_restart).
        self.resumed_after = resumed_after
        self.connects = 0  # successful subscribes
        self.reconnects = 0
        self.failed_connects = 0
        # An outage begins at the last frame received: for a restarted adapter that is no
        # later than when its previous run last produced.
        self.last_frame_ns = time.time_ns() if resumed_after is None else to_epoch_ns(resumed_after)
        self.subscribed = asyncio.Event()  # set while subscribed (tests wait on it)
        self._log = log.bind(connection=index, tokens=len(tokens))

    async def run(self) -> None:
        """Until cancelled."""
        outage: int | None = None
        down_reason = ""
        attempt = 0
        while True:
            reason = "error"
            try:
                async with connect(
                    self.config.url(),
                    open_timeout=self.config.connect_timeout_s,
                    close_timeout=1.0,
                    max_size=2**22,
                ) as ws:
                    await self._subscribe(ws)
                    now = time.time_ns()
                    self.last_frame_ns = now
                    await self._connected(outage, down_reason, now)
                    outage, attempt = None, 0
                    reason = await self._read(ws)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
                self.failed_connects += 1
                error = repr(e)[:300].replace(self.config.access_token, "***")  # URLs hold it
                self._log.warning("kite connect failed", error=error, attempt=attempt)
            except ConnectionClosed as e:  # closed while subscribing
                reason = "closed"
                self._log.warning("kite connection closed", code=e.rcvd and e.rcvd.code)
            finally:
                self.subscribed.clear()
                metrics.CONNECTED.labels(str(self.index)).set(0)
            if outage is None:
                outage = await self.state.open_outage(
                    self.index, self.tokens, self.last_frame_ns, reason
                )
                down_reason = reason
                self._log.warning("kite connection down", reason=reason, outage_id=outage)
            await asyncio.sleep(
                backoff_s(
                    attempt,
                    self.config.reconnect_initial_delay_s,
                    self.config.reconnect_max_delay_s,
                )
            )
            attempt += 1

    async def _subscribe(self, ws: ClientConnection) -> None:
        tokens = list(self.tokens)
        await ws.send(subscribe_message(tokens).decode())
        await ws.send(mode_message(self.config.mode, tokens).decode())

    async def _connected(self, outage: int | None, down_reason: str, now: int) -> None:
        """Bookkeeping of a successful subscribe: close the outage it ends, count and log it."""
        self.connects += 1
        if self.connects == 1:
            # A previous run that died while down left its outage open: it ends now. Else the
            # time since that run last produced is this connection's outage.
            abandoned = await self.state.close_abandoned(self.index, now, keep=outage)
            if not abandoned and outage is None and self.resumed_after is not None:
                outage = await self.state.open_outage(
                    self.index, self.tokens, self.resumed_after, "adapter_restart"
                )
                down_reason = "adapter_restart"
            self._log.info("kite subscribed", mode=str(self.config.mode))
        if outage is not None:
            await self.state.close_outage(outage, now)
            self.reconnects += 1
            metrics.RECONNECTS.labels(down_reason).inc()
            self._log.warning("kite reconnected", outage_id=outage, reason=down_reason,
                              reconnects=self.reconnects)  # fmt: skip
        self.subscribed.set()
        metrics.CONNECTED.labels(str(self.index)).set(1)

    async def _read(self, ws: ClientConnection) -> str:
        """Frames until the connection drops; returns why (closed or watchdog)."""
        timeout = self.config.heartbeat_timeout_s
        while True:
            try:
                # Cancelling recv() loses nothing (websockets' asyncio API): safe as a watchdog.
                msg = await asyncio.wait_for(ws.recv(), timeout)
            except TimeoutError:
                self._log.warning("kite connection silent: reconnecting", silent_s=timeout)
                ws.transport.abort()  # a silent peer may not answer a close handshake either
                return "watchdog"
            except ConnectionClosed as e:
                self._log.warning("kite connection closed", code=e.rcvd and e.rcvd.code)
                return "closed"
            self.last_frame_ns = now = time.time_ns()
            try:
                if isinstance(msg, bytes):
                    await self.on_binary(self.index, msg, now)
                else:
                    self.on_text(self.index, msg)
            except Exception as e:
                # The sink or the database failed past their retries: not a connection
                # problem to reconnect from; the feed ends (feed.py).
                raise HandlerFailed(f"connection {self.index}: frame handling failed") from e
