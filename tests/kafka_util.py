"""Test helpers around real Kafka: private topics, fast producing, group catch-up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka import Producer

from nadi.kafka_admin import group_offsets
from nadi.kafka_produce import produce_waiting


async def create_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    name = f"{prefix}.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=name, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    return name


def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Send (key, value) pairs in order (per key order is kept) and wait for every ack."""
    p = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "enable.idempotence": True}
    )
    n = 0
    for key, value in messages:
        produce_waiting(p, topic, value, key)
        n += 1
        if n % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0, "messages left unacknowledged"
    return n


async def wait_caught_up(bootstrap: str, group: str, topic: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    ends: dict[int, int] = {}
    done: dict[int, int] = {}
    while time.monotonic() < deadline:
        # In a thread: the worker under test may share this event loop.
        ends, done = await asyncio.to_thread(group_offsets, bootstrap, group, topic)
        if all(done.get(p, -1) >= end for p, end in ends.items() if end > 0):
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"group {group} did not catch up on {topic}: {done} vs {ends}")


async def read_all(bootstrap: str, topic: str, timeout_s: float = 10) -> list[object]:
    c = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await c.start()
    out: list[object] = []
    try:
        ends = await c.end_offsets(
            [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        )
        total = sum(ends.values())
        deadline = time.monotonic() + timeout_s
        while len(out) < total and time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(recs)
    finally:
        await c.stop()
    return out
