"""Producing through librdkafka's bounded local queue: when it is full, wait for room (serving
delivery reports, which is what frees it), never drop and never raise ``BufferError``.

Ordering per key is librdkafka's (idempotent producers keep it); these helpers only wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

OnDelivery = Callable[[Any, Any], None]


def _offer(
    p: Producer, topic: str, value: bytes, key: bytes | None, on_delivery: OnDelivery | None
) -> bool:
    """One ``produce``; False when the local queue is full."""
    try:
        p.produce(topic, value, key, on_delivery=on_delivery)
    except BufferError:
        return False
    return True


def produce_waiting(
    p: Producer,
    topic: str,
    value: bytes,
    key: bytes | None,
    on_delivery: OnDelivery | None = None,
    *,
    wait_s: float = 0.05,
) -> None:
    """``p.produce``; while the local queue is full, polls for up to ``wait_s`` seconds a try."""
    while not _offer(p, topic, value, key, on_delivery):
        p.poll(wait_s)


async def produce_waiting_async(
    p: Producer, topic: str, value: bytes, key: bytes | None, on_delivery: OnDelivery
) -> None:
    """As :func:`produce_waiting`, but each wait (5 ms) yields to the event loop."""
    while not _offer(p, topic, value, key, on_delivery):
        p.poll(0)
        await asyncio.sleep(0.005)
