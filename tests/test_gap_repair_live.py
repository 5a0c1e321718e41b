"""A repaired tick of today reaches the ring and the live stream, like a late arrival; one of
an earlier day does not (it would land in live charts as news). Real PostgreSQL and Redis;
the recovery source is a small in-test implementation of the project's interface."""

from __future__ import annotations

import asyncio
import time
from datetime import date
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from nadi.calendar import today_ist
from nadi.db.tick_writer import init_connection, write_batch
from nadi.redis_keys import RedisKeys
from nadi.repair import GapOutcome, claim_for_run, repair_batch
from nadi.ring import RingWriter, decode_live_entry
from nadi.sequence import Gap
from nadi.settings import Settings
from nadi.tick import Tick
from nadi.times import NS, trading_day_ordinal
from pipelines.resources import RecoverySourceResource
from tests.feedgen import tick
from tests.processor_util import reset_state

TOKEN = 2714625


class _Source(RecoverySourceResource):
    """Knows every tick of ``TOKEN`` today and yesterday (sequence s at base + s µs)."""

    today_ns: int

    def _tick(self, day: date, seq: int) -> Tick:
        days_back = date.fromordinal(_ordinal(self.today_ns)).toordinal() - day.toordinal()
        base = self.today_ns - days_back * 86_400 * NS
        return tick(TOKEN, seq, base + seq * 1000, price=100 + seq / 100)

    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        return [self._tick(day, s) for s in range(from_seq, to_seq + 1)]

    async def bhavcopy(self, day: date) -> str | None:
        return None


async def _repair(
    pg: asyncpg.Connection, src: _Source, ring: RingWriter, today: date
) -> list[GapOutcome]:
    """Every open gap, as a run started by hand does it (claim, repair, release)."""
    gaps = await claim_for_run(pg, "test", gap_ids=[], day=None)
    return await repair_batch(
        pg, src, gaps, key="test", today=today, max_attempts=3, concurrency=4, ring=ring
    )


def _ordinal(ts_ns: int) -> int:
    return trading_day_ordinal(ts_ns) + date(1970, 1, 1).toordinal()


async def test_todays_repaired_ticks_go_live_and_older_ones_do_not(
    migrated: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    await reset_state(pg, migrated)
    now = time.time_ns() - NS
    if date.fromordinal(_ordinal(now)) != today_ist():  # just past midnight IST: wait it out
        await asyncio.sleep(2)
        now = time.time_ns() - NS
    src = _Source(today_ns=now)
    today = date.fromordinal(_ordinal(now))
    yesterday = date.fromordinal(today.toordinal() - 1)
    await init_connection(pg)
    for day in (today, yesterday):
        held = [src._tick(day, s) for s in (1, 2, 5, 6)]  # 3..4 never arrived
        d = trading_day_ordinal(held[0].exchange_ts)
        await write_batch(pg, held, [d] * 4, ["OK", "OK", "STALE", "OK"], [Gap(TOKEN, d, 3, 4)],
                          mark_dirty=True)  # fmt: skip
    keys = await RedisKeys.load(pg)
    ring = RingWriter(redis_client, keys, maxlen=1000, ttl_s=600)
    outcomes = await _repair(pg, src, ring, today)
    assert sorted((o.status, o.inserted, o.pushed_live) for o in outcomes) == [
        ("repaired", 2, 0),
        ("repaired", 2, 2),
    ]
    entries: Any = await redis_client.xrange(keys.ring(TOKEN))
    ring_ticks = [orjson.loads(f[b"d"]) for _, f in entries]
    assert [(t["sequence_id"], t["status"]) for t in ring_ticks] == [
        (3, "RECOVERED"),
        (4, "RECOVERED"),
    ]
    assert all(_ordinal(t["exchange_ts"]) == today.toordinal() for t in ring_ticks)
    live: Any = await redis_client.xrange(keys.live)
    assert [(e.t.sequence_id, e.t.status) for _, f in live for e in decode_live_entry(f)] == [
        (3, "RECOVERED"),
        (4, "RECOVERED"),
    ]
    # A second run finds nothing open: nothing is pushed twice.
    assert await _repair(pg, src, ring, today) == []
    assert not await pg.fetchval("SELECT count(*) FROM sequence_gaps WHERE claimed_by IS NOT NULL")
    after: Any = await redis_client.xrange(keys.ring(TOKEN))
    assert len(after) == 2
