"""The Kite feed: its connections, the sequencer and the sink, owned together.

:meth:`KiteFeed.run` loads the sequence state, then runs one task per connection in a
TaskGroup: cancelling ``run`` cancels them all, and one failing (the database or Kafka down
past the sink's own retries) ends the others and the run with that error, so a supervisor
restarts a clean process that continues the numbering from the database.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from aiokafka import AIOKafkaProducer

from nadi.codec import encode
from nadi.tick import Tick
from nadi.times import trading_day_ordinal
from streaming.feeds.kite import metrics
from streaming.feeds.kite.config import FEED_NAME, KiteFeedConfig
from streaming.feeds.kite.connection import KiteConnection
from streaming.feeds.kite.mapping import Sequencer, map_packets
from streaming.feeds.kite.protocol import decode_frame, decode_text
from streaming.feeds.kite.state import FeedState

log = structlog.get_logger("nadi.feeds.kite")


class TickSink(Protocol):
    async def send(self, ticks: list[Tick]) -> None:
        """Make ``ticks`` durable, in order; return only when they are."""


class KafkaTickSink:
    """Ticks to a topic as v1 JSON, keyed by token; idempotent producer, acks from all
    in-sync replicas, so a retried batch is neither lost nor doubled nor reordered."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            # A full frame of 3,000 packets is ~1 MB of JSON: 16 KB batches (the default)
            # would make it wait on many more broker round trips.
            max_batch_size=512 * 1024,
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def send(self, ticks: list[Tick]) -> None:
        futures = [
            await self.producer.send(
                self.topic, encode(t, feed=FEED_NAME), key=str(t.instrument_token).encode()
            )
            for t in ticks
        ]
        await asyncio.gather(*futures)


@dataclass
class FeedStats:
    """What the feed saw, for the summary line and the tests (the metrics count the same)."""

    frames: int = 0
    heartbeats: int = 0
    packets: Counter[str] = field(default_factory=Counter)  # by Kind
    ticks: int = 0
    no_price: int = 0
    bad: Counter[str] = field(default_factory=Counter)  # by reason
    text: Counter[str] = field(default_factory=Counter)  # by type


class KiteFeed:
    """One adapter run over ``config.connections``."""

    def __init__(self, config: KiteFeedConfig, state: FeedState, sink: TickSink) -> None:
        self.config = config
        self.state = state
        self.sink = sink
        self.stats = FeedStats()
        self.sequencer = Sequencer()
        self.connections: list[KiteConnection] = []
        self.ready = asyncio.Event()  # connections built (tests wait on it)

    async def run(self) -> None:
        """Until cancelled (or a connection task fails); :class:`FeedLocked` at once if
        another adapter of the feed runs against the database."""
        async with self.state.exclusive():
            await self._run()

    async def _run(self) -> None:
        today = trading_day_ordinal(time.time_ns())
        # Yesterday too: ticks stamped just before midnight IST can still arrive after it.
        self.sequencer = Sequencer(await self.state.load_sequences(today - 1))
        self.connections = [
            KiteConnection(
                i,
                tokens,
                self.config,
                self.state,
                self._on_binary,
                self._on_text,
                resumed_after=await self.state.last_activity(tokens, today),
            )
            for i, tokens in enumerate(self.config.connections)
        ]
        self.ready.set()
        log.info(
            "kite feed starting",
            connections=len(self.connections),
            tokens=len(self.config.tokens),
            mode=str(self.config.mode),
            topic=self.config.topic,
        )
        async with asyncio.TaskGroup() as tg:
            for c in self.connections:
                tg.create_task(c.run(), name=f"kite-connection-{c.index}")

    async def _on_binary(self, connection: int, data: bytes, received_ns: int) -> None:
        frame = decode_frame(data)
        if frame.heartbeat:
            self.stats.heartbeats += 1
            metrics.FRAMES.labels("heartbeat").inc()
            return
        self.stats.frames += 1
        metrics.FRAMES.labels("binary").inc()
        for b in frame.bad:
            self.stats.bad[b.reason] += 1
            metrics.BAD.labels(b.reason).inc()
            log.warning("kite bad packet", connection=connection, reason=b.reason,
                        offset=b.offset, length=len(b.data), hex=b.hex())  # fmt: skip
        for p in frame.packets:
            self.stats.packets[p.kind] += 1
            metrics.PACKETS.labels(p.kind.value).inc()
        ticks, keys, skipped = map_packets(frame.packets, received_ns, self.sequencer)
        self.stats.no_price += skipped
        metrics.NO_PRICE.inc(skipped)
        if not ticks:
            return
        # Numbers first, then the produce: a crash between the two never reuses a number.
        await self.state.save_sequences((k, self.sequencer.last(k)) for k in keys)
        await self.sink.send(ticks)
        self.stats.ticks += len(ticks)
        metrics.TICKS.inc(len(ticks))

    def _on_text(self, connection: int, text: str) -> None:
        msg = decode_text(text)
        kind = "invalid" if msg is None else msg.type
        self.stats.text[kind] += 1
        metrics.TEXT.labels(kind if kind in ("error", "order", "message") else "other").inc()
        shown = text[:300]
        if kind == "error":
            log.error("kite server error", connection=connection, message=shown)
        elif kind == "invalid":
            log.warning("kite text frame not understood", connection=connection, text=shown)
        else:
            # Order updates are not market data: logged and counted, not produced.
            log.info("kite server message", connection=connection, type=kind, message=shown)
