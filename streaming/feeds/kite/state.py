"""What a restart of the adapter needs, in PostgreSQL (dbt_or_sql/0016_feed_state.sql).

Why the database and written ahead of the produce: the numbers must survive a kill -9 at
any instant without being reused. Upserting a frame's highest numbers before producing the
frame means every number that can be in Kafka is at or below what the table says; reading
Kafka back instead would need a scan of the whole day's topic at start-up (a quiet instrument's
last tick can be hours back). The cost is one small upsert per received frame (Kite batches a
connection's packets into about one frame a second).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime

import asyncpg
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from nadi.times import ordinal_date, to_datetime_us
from streaming.feeds.kite.mapping import DayKey

# A database blip (restart, failover, a dropped connection) is waited out for half a minute;
# beyond that the error ends the feed (nothing is produced whose numbers are not recorded).
_transient = retry(
    retry=retry_if_exception_type(
        (
            OSError,
            TimeoutError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError,
        )
    ),
    wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
    stop=stop_after_delay(30),
    reraise=True,
)


def _ts(ns: int) -> datetime:
    return to_datetime_us(ns // 1000)


class FeedLocked(RuntimeError):
    """Another adapter of the feed holds the database's lock."""


class FeedState:
    """Sequence high-water marks and outages of one feed, through ``pool`` (nadi_ingest)."""

    def __init__(self, pool: asyncpg.Pool, feed: str) -> None:
        self.pool = pool
        self.feed = feed

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Held for a whole run: a second adapter of the same feed on this database (which
        would hand out the same numbers) is refused. A session advisory lock on a connection
        of its own, so a killed adapter's lock goes with its connection."""
        conn = await self.pool.acquire()
        try:
            key = f"nadi.feed.{self.feed}"
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                raise FeedLocked(
                    f"another `nadi feed {self.feed}` runs against this database: refusing to "
                    "number the same instruments twice"
                )
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
        finally:
            await self.pool.release(conn)

    async def load_sequences(self, since_day: int) -> dict[DayKey, int]:
        """Last numbers handed out for trading days from ``since_day`` (an ordinal) on."""
        rows = await self.pool.fetch(
            "SELECT instrument_token, trading_day, last_seq FROM feed_sequences "
            "WHERE feed = $1 AND trading_day >= $2",
            self.feed,
            ordinal_date(since_day),
        )
        base = ordinal_date(0)
        return {(r[0], (r[1] - base).days): r[2] for r in rows}

    @_transient
    async def save_sequences(self, marks: Iterable[tuple[DayKey, int]]) -> None:
        """Upsert high-water marks (only ever moving up)."""
        items = sorted(marks)
        if not items:
            return
        await self.pool.execute(
            """
            INSERT INTO feed_sequences AS s (feed, instrument_token, trading_day, last_seq)
            SELECT $1, t, d, q FROM unnest($2::bigint[], $3::date[], $4::bigint[]) AS u(t, d, q)
            ON CONFLICT (feed, instrument_token, trading_day)
            DO UPDATE SET last_seq = greatest(s.last_seq, excluded.last_seq), updated_at = now()
            """,
            self.feed,
            [k[0] for k, _ in items],
            [ordinal_date(k[1]) for k, _ in items],
            [q for _, q in items],
        )

    async def last_activity(self, tokens: Sequence[int], day: int) -> datetime | None:
        """When numbers were last handed out for any of ``tokens`` on ``day``: where a previous
        run of the adapter stopped producing."""
        value = await self.pool.fetchval(
            "SELECT max(updated_at) FROM feed_sequences "
            "WHERE feed = $1 AND trading_day = $2 AND instrument_token = ANY($3::bigint[])",
            self.feed,
            ordinal_date(day),
            list(tokens),
        )
        return value  # type: ignore[no-any-return]

    @_transient
    async def open_outage(
        self, connection: int, tokens: Sequence[int], started: datetime | int, reason: str
    ) -> int:
        """Record an outage that has begun (``started``: a datetime or UTC epoch ns)."""
        start = _ts(started) if isinstance(started, int) else started
        oid = await self.pool.fetchval(
            "INSERT INTO feed_outages (feed, connection, instruments, started_at, reason) "
            "VALUES ($1, $2, $3::bigint[], $4, $5) RETURNING id",
            self.feed,
            connection,
            list(tokens),
            start,
            reason,
        )
        return int(oid)

    @_transient
    async def close_outage(self, outage_id: int, ended_ns: int) -> None:
        await self.pool.execute(
            "UPDATE feed_outages SET ended_at = greatest(started_at, $2) WHERE id = $1",
            outage_id,
            _ts(ended_ns),
        )

    @_transient
    async def close_abandoned(self, connection: int, ended_ns: int, keep: int | None) -> int:
        """Close outages a previous run left open on ``connection`` (it died while down);
        ``keep`` is this run's own open outage, if any."""
        result = await self.pool.execute(
            "UPDATE feed_outages SET ended_at = greatest(started_at, $3) "
            "WHERE feed = $1 AND connection = $2 AND ended_at IS NULL AND id <> $4",
            self.feed,
            connection,
            _ts(ended_ns),
            -1 if keep is None else keep,
        )
        return int(result.split()[-1])
