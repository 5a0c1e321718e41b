"""Dagster resources, fed from :class:`nadi.settings.Settings`.

Ops are synchronous in Dagster's default executor, and Nadi's storage code is asyncio
(asyncpg); :func:`run_async` bridges the two. Each resource keeps only configuration (what the
UI shows and a run's config can override); connections are opened per use inside the op's own
event loop, since asyncpg connections cannot cross loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import asyncpg
import redis.asyncio as aioredis
from dagster import ConfigurableResource

from nadi.bhavcopy import Fetched, Segment, load_bhavcopy
from nadi.db.tick_writer import init_connection
from nadi.recovery import RecoveryClient, fetch_retransmission
from nadi.repair import Retransmitter
from nadi.settings import Settings
from nadi.tick import Tick

T = TypeVar("T")

if TYPE_CHECKING:  # the resource value of a ConfigurableResource is the resource itself
    _Resource = ConfigurableResource[Any]
else:
    _Resource = ConfigurableResource


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous op code.

    Normally there is no running loop (ops run in a worker thread or process) and
    ``asyncio.run`` is enough; when the caller already runs a loop (an async test calling
    ``materialize``), the coroutine gets its own loop in a helper thread instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class TimescaleResource(_Resource):
    """The TimescaleDB database holding ticks, gaps, candles and reconciliations.

    ``dsn`` is the maintenance role's (``NADI_PG_MAINT_DSN``, role nadi_maint of
    dbt_or_sql/0013_roles.sql): what every asset connects with. Owner-only TimescaleDB work goes
    through the ``nadi_maint_*`` functions. ``owner_dsn`` (``NADI_PG_DSN``) is used only to apply
    migrations; empty means ``dsn``.
    """

    dsn: str
    owner_dsn: str = ""

    @asynccontextmanager
    async def connect(self, *, staging: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A connection in UTC; ``staging`` adds the tick writer's session temp tables."""
        conn = await asyncpg.connect(
            self.dsn,
            command_timeout=3600,  # a year-long backfill chunk or VACUUM can take a while
            server_settings={"application_name": "nadi-dagster", "timezone": "UTC"},
        )
        try:
            if staging:
                await init_connection(conn)
            yield conn
        finally:
            await conn.close()

    def settings(self, base: Settings) -> Settings:
        """``base`` pointed at this database as its owner (for
        :func:`nadi.db.migrate.run_migrations`)."""
        return base.model_copy(update={"pg_dsn": self.owner_dsn or self.dsn})


class RedisResource(_Resource):
    """The Redis holding the processor's per-instrument rings and sequence state."""

    url: str
    ring_maxlen: int = 10_000  # entries per instrument ring (NADI_RING_MAXLEN)
    ttl_s: int = 2 * 86_400  # of the ring's bookkeeping keys (NADI_DEDUP_TTL_S)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[aioredis.Redis]:
        c = aioredis.from_url(self.url)
        try:
            yield c
        finally:
            await c.aclose()


class KafkaResource(_Resource):
    """The Kafka cluster; replays go to ``replay_topic`` unless a run says otherwise."""

    bootstrap: str
    replay_topic: str
    partitions: int = 12


@runtime_checkable
class RecoverySource(Protocol):
    """Where missed ticks come from (the end-of-day files: :class:`BhavcopySourceResource`)."""

    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        """Ticks ``from_seq..to_seq`` (inclusive) of ``token`` on ``day``; fewer when the source
        does not have them all; raises on transport or server errors."""
        ...


class RecoverySourceResource(_Resource, ABC):
    """A :class:`RecoverySource` as a resource. ``max_attempts``: repair runs per gap before the
    gap is declared unrecoverable (``NADI_GAP_REPAIR_MAX_ATTEMPTS``)."""

    max_attempts: int = 3

    @abstractmethod
    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        """See :meth:`RecoverySource.retransmit`."""

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Retransmitter]:
        """What a batch of repairs fetches through (here: the resource itself)."""
        yield self


class SimulatorRecoveryResource(RecoverySourceResource):
    """The simulator's retransmission service (``nadi simulate`` serves it on port 8765)."""

    url: str
    timeout_s: float = 30.0

    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        return await fetch_retransmission(
            self.url, token, day, from_seq, to_seq, timeout_s=self.timeout_s
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Retransmitter]:
        """One pooled HTTP client for the whole batch."""
        async with RecoveryClient(self.url, timeout_s=self.timeout_s) as client:
            yield client


class BhavcopySourceResource(_Resource):
    """Where NSE's zipped UDiFF bhavcopy files come from: ``directory`` first (where an
    operator or ``nadi simulate --bhavcopy-dir`` drops them), then ``url_template``
    (``NADI_BHAVCOPY_URL``; by default the recovery service's ``/v1/bhavcopy/{filename}``)."""

    directory: str = ""
    url_template: str = ""
    timeout_s: float = 30.0

    async def fetch(self, segment: Segment, day: date) -> Fetched | None:
        """The day's file of ``segment``, or None when neither place has it."""
        return await load_bhavcopy(
            segment, day, directory=self.directory, url_template=self.url_template,
            timeout_s=self.timeout_s,
        )  # fmt: skip


def resources_from_settings(settings: Settings) -> dict[str, _Resource]:
    """The resource set of the code location, keyed as the assets ask for them."""
    return {
        "timescale": TimescaleResource(dsn=settings.maint_dsn, owner_dsn=settings.pg_dsn),
        "redis": RedisResource(
            url=settings.redis_url, ring_maxlen=settings.ring_maxlen, ttl_s=settings.dedup_ttl_s
        ),
        "kafka": KafkaResource(
            bootstrap=settings.kafka_bootstrap,
            replay_topic=settings.topic_replay,
            partitions=settings.ticks_partitions,
        ),
        "recovery": SimulatorRecoveryResource(
            url=settings.recovery_url,
            max_attempts=settings.gap_repair_max_attempts,
        ),
        "bhavcopy": BhavcopySourceResource(
            directory=str(settings.bhavcopy_dir), url_template=settings.bhavcopy_url_template
        ),
    }
