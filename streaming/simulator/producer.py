"""A fast Kafka producer for feed messages (confluent-kafka / librdkafka), with pacing.

Idempotent (``enable.idempotence``, ``acks=all``), lz4-compressed and batched. A full local
queue (BufferError) is handled by serving delivery reports until there is room.

Benchmark: ``python -m streaming.simulator.producer --bench [--ticks N] [--topic T]``
prints one JSON line (ticks/s and messages/s, generation and encoding included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from nadi.kafka_produce import produce_waiting
from streaming.simulator.feed import FeedMessage

PRODUCER_CONFIG: dict[str, str | int | bool] = {
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "acks": "all",
    "enable.idempotence": True,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    # Per-message success callbacks cost ~0.5 us of Python each; only failures are reported.
    "delivery.report.only.error": True,
}


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 30.0) -> None:
    """Create ``topic`` if it does not exist (replication factor 1, the local broker)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=timeout_s)
    if topic in md.topics and md.topics[topic].error is None:
        return
    fut = admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=timeout_s)[topic]
    try:
        fut.result(timeout=timeout_s)
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


@dataclass(slots=True)
class ProducerStats:
    produced: int = 0
    delivered: int = 0  # known after close(): produced - failed - undelivered
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class TickProducer:
    """Produces :class:`FeedMessage` s to one topic. Call :meth:`close` to flush."""

    def __init__(self, bootstrap: str, topic: str, **overrides: str | int | bool) -> None:
        self.topic = topic
        self.stats = ProducerStats()
        self._p = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG, **overrides})

    def _on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self.stats.failed += 1
            if len(self.stats.errors) < 10:
                self.stats.errors.append(str(err))

    def produce(self, key: bytes, value: bytes) -> None:
        """Queue one record; waits for room when librdkafka's queue is full."""
        produce_waiting(self._p, self.topic, value, key, self._on_delivery)
        self.stats.produced += 1
        if self.stats.produced % 1000 == 0:
            self._p.poll(0)

    def send(
        self,
        messages: Iterable[FeedMessage],
        *,
        rate: float = 0.0,
        pace_by_exchange_ts: bool = False,
        stop_at_ns: int | None = None,
    ) -> int:
        """Produce messages; returns how many were queued.

        ``pace_by_exchange_ts`` (live mode): a tick is sent no earlier than its ``exchange_ts``,
        so ``exchange_ts`` ~ now on the wire. Otherwise ``rate`` > 0 caps valid feed-A ticks
        per second (0: as fast as possible). ``stop_at_ns``: wall-clock deadline (epoch ns).
        """
        n = 0
        start = time.perf_counter()
        ticks = 0
        clock = time.time_ns
        for m in messages:
            t = m.tick
            if t is not None and m.feed == "A":
                ticks += 1
                if pace_by_exchange_ts:
                    ahead = t.exchange_ts - clock()
                    if ahead > 1_000_000:  # sleep only when >1 ms early: sleeping is coarse
                        self._p.poll(0)
                        time.sleep(ahead / 1e9)
                elif rate > 0 and ticks % 64 == 0:  # check the clock once per 64 ticks
                    ahead_s = ticks / rate - (time.perf_counter() - start)
                    if ahead_s > 0.001:
                        self._p.poll(0)
                        time.sleep(ahead_s)
                if stop_at_ns is not None and ticks % 256 == 0 and clock() >= stop_at_ns:
                    break
            self.produce(m.key, m.value)
            n += 1
        return n

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush; returns the number of records still undelivered (0 when all made it)."""
        left = int(self._p.flush(timeout_s))
        self.stats.delivered = self.stats.produced - self.stats.failed - left
        return left


def _bench(argv: list[str]) -> dict[str, object]:
    from datetime import date

    from nadi.calendar import previous_trading_day, today_ist
    from nadi.instruments import bundled_instruments
    from nadi.settings import get_settings
    from streaming.simulator.feed import FeedSimulator
    from streaming.simulator.generator import DayGenerator

    ap = argparse.ArgumentParser(prog="python -m streaming.simulator.producer")
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--ticks", type=int, default=1_000_000)
    ap.add_argument("--topic", default="bench.simulator")
    ap.add_argument("--dup-rate", type=float, default=1.0)
    ap.add_argument("--partitions", type=int, default=12)
    a = ap.parse_args(argv)
    s = get_settings()
    ensure_topic(s.kafka_bootstrap, a.topic, a.partitions)
    day: date = previous_trading_day(today_ist())
    gen = DayGenerator(bundled_instruments(day), 1, day, density=100.0)
    feed = FeedSimulator(1, day, dup_rate=a.dup_rate)
    prod = TickProducer(s.kafka_bootstrap, a.topic)
    t0 = time.perf_counter()
    sent = prod.send(feed.messages(gen.stream(max_ticks=a.ticks)))
    queued_s = time.perf_counter() - t0
    left = prod.close()
    elapsed = time.perf_counter() - t0
    ticks = feed.stats.ticks_in
    return {
        "bench": "simulator_producer",
        "ticks": ticks,
        "messages": sent,
        "delivered": prod.stats.delivered,
        "failed": prod.stats.failed,
        "undelivered": left,
        "elapsed_s": round(elapsed, 3),
        "queue_s": round(queued_s, 3),
        "ticks_per_s": round(ticks / elapsed),
        "messages_per_s": round(sent / elapsed),
    }


if __name__ == "__main__":
    print(json.dumps(_bench(sys.argv[1:])))
