"""Kafka topics of DESIGN.md section 2, created idempotently."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError
from tenacity import (
    retry,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from nadi.settings import Settings


def topic_specs(s: Settings) -> dict[str, int]:
    """Topic name -> partition count."""
    return {
        s.topic_ticks: s.ticks_partitions,
        s.topic_dlq: 3,
        s.topic_replay: s.ticks_partitions,
    }


@retry(
    retry=retry_if_exception_type((KafkaConnectionError, KafkaError, OSError)),
    wait=wait_exponential(multiplier=0.2, max=2),
    stop=stop_after_delay(60),
    reraise=True,
)
async def ensure_topics(s: Settings) -> dict[str, int]:
    """Create missing topics; returns every wanted topic with its partition count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = topic_specs(s)
        missing = [
            NewTopic(name=t, num_partitions=n, replication_factor=1)
            for t, n in wanted.items()
            if t not in existing
        ]
        if missing:
            await admin.create_topics(missing)
        # A new topic's partitions reach the metadata a moment after create_topics returns.
        for _ in range(100):
            described = await admin.describe_topics(list(wanted))
            counts = {d["topic"]: len(d["partitions"]) for d in described}
            if all(counts.get(t, 0) > 0 for t in wanted):
                break
            await asyncio.sleep(0.1)
        return counts
    finally:
        await admin.close()


_COORDINATOR_NOT_READY = frozenset(
    (
        RdKafkaError.NOT_COORDINATOR,
        RdKafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        RdKafkaError.COORDINATOR_NOT_AVAILABLE,
    )
)


def _retriable(e: BaseException) -> bool:
    if not isinstance(e, KafkaException):
        return False
    err = e.args[0]
    return bool(err.retriable()) or err.code() in _COORDINATOR_NOT_READY


# A new broker answers NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS (retriable errors) until
# it has loaded __consumer_offsets: wait for it rather than fail the caller.
@retry(
    retry=retry_if_exception(_retriable),
    stop=stop_after_delay(60),
    wait=wait_exponential(multiplier=0.1, max=2),
    reraise=True,
)
def _committed(c: Consumer, tps: list[TopicPartition]) -> list[TopicPartition]:
    return list(c.committed(tps, timeout=10))


def group_offsets(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(end offsets, offsets committed by ``group``; negative where none) per partition of
    ``topic``. Blocking (librdkafka): call it from a thread in async code."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        tps = [TopicPartition(topic, p) for p in parts]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        done = {tp.partition: tp.offset for tp in _committed(c, tps)}
        return ends, done
    finally:
        c.close()
