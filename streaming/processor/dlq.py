"""Dead-letter publishing: the original bytes and headers, plus why and where from."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from nadi.codec import Rejected
from streaming.processor import metrics


def dlq_headers(
    record: ConsumerRecord[bytes, bytes], rejected: Rejected
) -> list[tuple[str, bytes]]:
    original = [(k, v) for k, v in (record.headers or ()) if k not in _OURS]
    return [
        *original,
        ("reason", str(rejected.reason).encode()),
        ("detail", rejected.detail[:512].encode("utf-8", "replace")),
        ("topic", record.topic.encode()),
        ("partition", str(record.partition).encode()),
        ("offset", str(record.offset).encode()),
    ]


_OURS = {"reason", "detail", "topic", "partition", "offset"}


async def publish(
    producer: AIOKafkaProducer,
    topic: str,
    rejects: Sequence[tuple[ConsumerRecord[bytes, bytes], Rejected]],
) -> None:
    """Send every reject and wait until Kafka has acknowledged all of them (acks=all)."""
    if not rejects:
        return
    futures = [
        await producer.send(topic, value=rec.value, key=rec.key, headers=dlq_headers(rec, rej))
        for rec, rej in rejects
    ]
    await asyncio.gather(*futures)
    for _, rej in rejects:
        metrics.DLQ.labels(reason=str(rej.reason)).inc()
