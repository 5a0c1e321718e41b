"""The worker's sinks: where a batch becomes durable, and how it waits while one is down.

``Flow`` owns what every step that can fail shares: retry with backoff (tenacity) while the
worker's partitions are paused (paused partitions fetch nothing, so nothing piles up in
memory; the main loop keeps polling, which keeps the member in the group), and when to give
up (the worker stopping, partitions being revoked): then the step raises ``Abandoned`` and
the batch stays uncommitted, to be redelivered.

``Sink`` is one durable destination (the database, the ring): a GroupCommit (parts written in
submission order, queued ones merged into one write) whose writes go through ``Flow.retry``.
Built once per worker run; ``after_write`` is the crash-point hook.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from nadi.logs import get_logger
from streaming.processor import metrics
from streaming.processor.group_commit import GroupCommit, Part

log = get_logger(__name__)
T = TypeVar("T")
P = TypeVar("P", bound=Part)
R = TypeVar("R")


class Abandoned(Exception):
    """The worker is stopping or its partitions are being revoked: leave the batch
    uncommitted (the next owner gets its records again)."""


class Flow:
    """Retry, pause/resume and giving up, for the steps of one worker's batches."""

    def __init__(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        self._consumer = consumer
        self._stop = stop
        self._paused = 0
        self.revoking = False
        self._wake = asyncio.Event()  # set when giving up: cuts backoff sleeps short

    @property
    def giving_up(self) -> bool:
        return self._stop.is_set() or self.revoking

    def interrupt(self) -> None:
        """Wake the steps sleeping between attempts (call after stopping or revoking)."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def retry(
        self,
        step: str,
        fn: Callable[[], Awaitable[T]],
        *,
        fatal: tuple[type[BaseException], ...] = (),
    ) -> T:
        """``fn()`` until it succeeds, pausing the partitions meanwhile. Raises Abandoned when
        giving up, and ``fatal`` exceptions at once."""
        paused = False

        def before_sleep(state: RetryCallState) -> None:
            nonlocal paused
            metrics.WRITE_RETRIES.labels(sink=step).inc()
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "batch step failed; retrying",
                sink=step,
                attempt=state.attempt_number,
                error=repr(error)[:300],
            )
            if not paused:
                self._pause()
                paused = True

        try:
            async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.2),
                retry=retry_if_not_exception_type((Abandoned, *fatal)),
                stop=lambda _: self.giving_up,
                sleep=self._sleep,
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    return await fn()
        except Abandoned:
            raise
        except fatal:
            raise
        except Exception as e:
            if self.giving_up:
                raise Abandoned from e
            raise
        finally:
            if paused:
                self._resume()
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _sleep(self, seconds: float) -> None:
        if self.giving_up:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _pause(self) -> None:
        self._paused += 1
        if self._paused == 1:
            self._consumer.pause(*self._consumer.assignment())
            metrics.PAUSED.set(1)

    def _resume(self) -> None:
        self._paused -= 1
        if self._paused == 0:
            # Whatever is assigned now (a rebalance meanwhile gives fresh, unpaused ones).
            self._consumer.resume(*self._consumer.assignment())
            metrics.PAUSED.set(0)

    def assigned(self) -> None:
        """After an assignment: partitions come unpaused; pause them again if a step is
        still retrying."""
        if self._paused > 0:
            self._consumer.pause(*self._consumer.assignment())


class Sink(Generic[P, R]):
    """One durable destination: ordered, group-committed, retried writes."""

    def __init__(
        self,
        name: str,
        write_many: Callable[[Sequence[P]], Awaitable[list[R]]],
        flow: Flow,
        *,
        max_size: int,
        fatal: tuple[type[BaseException], ...] = (),
        after_write: Callable[[Sequence[P]], None] | None = None,
    ) -> None:
        self.name = name
        self._write_many = write_many
        self._flow = flow
        self._fatal = fatal
        self._after_write = after_write
        self._group: GroupCommit[P, R] = GroupCommit(self._write, max_size=max_size)

    def submit(self, part: P, after: asyncio.Future[Any] | None = None) -> asyncio.Future[R]:
        """Queue ``part`` behind everything submitted before (and behind ``after``)."""
        return self._group.submit(part, after)

    async def aclose(self) -> None:
        await self._group.aclose()

    @property
    def transactions(self) -> int:
        return self._group.transactions

    @property
    def busy_s(self) -> float:
        return self._group.busy_s

    async def _write(self, parts: Sequence[P]) -> list[R]:
        out = await self._flow.retry(self.name, lambda: self._write_many(parts), fatal=self._fatal)
        if self._after_write is not None and any(q.size for q in parts):
            self._after_write(parts)
        return out
