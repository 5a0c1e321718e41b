"""Group commit for the processor's database writes.

Each transaction costs round trips and a WAL flush whatever its size. At low rates the worker
takes small batches off Kafka every millisecond or two, so writing each on its own would queue
them behind each other (and the in-flight window would then hold back the ring, i.e. the live
path). Here writes run one at a time in submission order, and every batch that queued up while
one ran goes into the next transaction together. A part may wait for another future (``after``:
its batch's previous stage); the parts behind it wait too, so submission order is write order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar


class Part(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def size(self) -> int: ...


P = TypeVar("P", bound=Part)
R = TypeVar("R")


class GroupCommit(Generic[P, R]):
    """Serialises ``write_many`` calls and coalesces what waits between them.

    ``write_many(parts)`` returns one result per part; it retries by itself and raises only when
    the parts must be given up (the worker stopping, partitions revoked). Then every queued part
    of that generation or older fails too, and so does any submitted later: they were prepared
    assuming the failed ones would land. Parts of a newer generation (after the processor's
    reset) are written again.
    """

    def __init__(
        self, write_many: Callable[[Sequence[P]], Awaitable[Sequence[R]]], *, max_size: int
    ) -> None:
        self._write_many = write_many
        self._max_size = max_size  # ticks per transaction; a single larger part still goes
        self._queue: list[tuple[P, asyncio.Future[R], asyncio.Future[Any] | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._failed: tuple[int, BaseException] | None = None
        self.transactions = 0
        self.busy_s = 0.0  # wall time with a write in progress

    def submit(self, part: P, after: asyncio.Future[Any] | None = None) -> asyncio.Future[R]:
        """Queue a part, to be written once ``after`` (if given) is done; the future resolves
        when it is durable. If ``after`` fails, the part fails with its exception unwritten."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if self._failed is not None and part.generation <= self._failed[0]:
            fut.set_exception(self._failed[1])
            return fut
        self._queue.append((part, fut, after))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return fut

    async def aclose(self) -> None:
        """Cancel a write in progress (its parts fail with CancelledError)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, fut, _ in self._queue:
            if not fut.done():
                fut.cancel()
        self._queue.clear()

    def _take(self) -> list[tuple[P, asyncio.Future[R], asyncio.Future[Any] | None]]:
        """The head of the queue: parts up to the size cap whose ``after`` is done."""
        n, size = 0, 0
        for part, _, after in self._queue:
            if n and (
                size + part.size > self._max_size or (after is not None and not after.done())
            ):
                break
            n += 1
            size += part.size
        group, self._queue = self._queue[:n], self._queue[n:]
        return group

    async def _drain(self) -> None:
        while self._queue:
            head = self._queue[0][2]
            if head is not None and not head.done():
                await asyncio.wait([head])
                continue  # the head may have changed meanwhile
            ready: list[tuple[P, asyncio.Future[R]]] = []
            for p, f, after in self._take():
                if after is not None and (after.cancelled() or after.exception() is not None):
                    self._fail([(p, f)], after.exception() or asyncio.CancelledError())
                else:
                    ready.append((p, f))
            if not ready:
                continue
            t0 = time.perf_counter()
            try:
                results = await self._write_many([p for p, _ in ready])
            except BaseException as e:
                self.busy_s += time.perf_counter() - t0
                self._fail(ready, e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            self.busy_s += time.perf_counter() - t0
            self.transactions += 1
            for (_, fut), r in zip(ready, results, strict=True):
                if not fut.done():
                    fut.set_result(r)

    def _fail(self, group: list[tuple[P, asyncio.Future[R]]], e: BaseException) -> None:
        """Fail ``group`` and every queued part of its generation or older: they were
        prepared assuming the failed ones would land."""
        generation = max(p.generation for p, _ in group)
        self._failed = (generation, e)
        rest = [(p, f, a) for p, f, a in self._queue if p.generation > generation]
        failed = group + [(p, f) for p, f, _ in self._queue if p.generation <= generation]
        self._queue = rest
        for _, fut in failed:
            if fut.done():
                continue
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
