"""Gap repair in batches against the real PostgreSQL: claims that never overlap (concurrent
claims, two sensor ticks at once), bounded concurrency towards the recovery source, and
gaps given up after N attempts. The recovery source is an in-test implementation of the
interface, the sensor the code location's own, evaluated on an ephemeral Dagster instance."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import date, datetime, time

import asyncpg
import pytest
from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context

from nadi.db.tick_writer import init_connection, write_batch
from nadi.repair import claim_batches, claim_for_run, gap_metrics, repair_batch
from nadi.sequence import Gap
from nadi.settings import Settings
from nadi.tick import Tick
from nadi.times import IST, NS, date_ordinal
from pipelines.resources import TimescaleResource
from pipelines.sensors import build_gap_repair_sensor
from tests.feedgen import tick
from tests.processor_util import reset_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

DAYS = (date(2025, 3, 12), date(2025, 3, 13))
TOKENS = list(range(5001, 5011))


def _ts(day: date, seq: int) -> int:
    base = int(datetime.combine(day, time(10, 0), IST).timestamp()) * NS
    return base + seq * 1_000_000


def _tick(token: int, day: date, seq: int) -> Tick:
    return tick(token, seq, _ts(day, seq), price=100 + seq / 100)


class _Source:
    """Has every tick, or none (``empty``); with ``hold``, each call waits until ``hold``
    calls are in flight at once, so the peak shows whether the caller bounds concurrency."""

    def __init__(self, *, empty: bool = False, hold: int = 0) -> None:
        self.empty = empty
        self.hold = hold
        self.in_flight = 0
        self.peak = 0
        self.calls = 0
        self.full = asyncio.Event()

    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold:
                if self.in_flight >= self.hold:
                    self.full.set()
                await asyncio.wait_for(self.full.wait(), 10)
            return [] if self.empty else [_tick(token, day, s) for s in range(from_seq, to_seq + 1)]
        finally:
            self.in_flight -= 1


async def _market(pg: asyncpg.Connection, settings: Settings, gaps_per_token: int) -> int:
    """Every token on both days with ``gaps_per_token`` one-tick holes each (sequence 3k+2
    missing), recorded through the processor's write path, detected a minute ago."""
    await reset_state(pg, settings)
    await init_connection(pg)
    n = 0
    for day in DAYS:
        d = date_ordinal(day)
        for token in TOKENS:
            top = 3 * gaps_per_token + 1
            held = [_tick(token, day, s) for s in range(1, top + 1) if s % 3 != 2]
            statuses = ["STALE" if t.sequence_id % 3 == 0 else "OK" for t in held]
            gaps = [Gap(token, d, s, s) for s in range(2, top, 3)]
            await write_batch(pg, held, [d] * len(held), statuses, gaps, mark_dirty=False)
            n += len(gaps)
    await pg.execute("UPDATE sequence_gaps SET detected_at = now() - INTERVAL '1 minute'")
    return n


async def test_concurrent_claims_never_take_a_gap_twice(
    migrated: Settings, pg: asyncpg.Connection
) -> None:
    total = await _market(pg, migrated, gaps_per_token=10)  # 200 gaps
    conns = [await asyncpg.connect(migrated.pg_dsn) for _ in range(4)]
    try:
        claims = await asyncio.gather(
            *(claim_batches(c, grace_s=1, batch_size=7, max_batches=5, max_attempts=3)
              for c in conns)
        )  # fmt: skip
        batches = [b for c in claims for b in c.batches]
        ids = [i for b in batches for i in b.gap_ids]
        assert len(ids) == len(set(ids)), "a gap was claimed twice"
        # Each call saw 35 rows of its own (4 x 35 < all): five batches of at most seven, each
        # of one day (a day's last batch may be short), never more.
        assert 4 * 35 < total and len(ids) <= 4 * 35
        assert all(len(c.batches) == 5 for c in claims)
        for b in batches:
            assert {g.trading_day for g in b.gaps} == {b.trading_day} and len(b.gaps) <= 7
        rows = await pg.fetch("SELECT id, claimed_by, repair_attempts FROM sequence_gaps"
                              " WHERE claimed_by IS NOT NULL")  # fmt: skip
        assert {r["id"]: r["claimed_by"] for r in rows} == {
            i: b.key for b in batches for i in b.gap_ids
        }
        assert {r["repair_attempts"] for r in rows} == {1}
    finally:
        for c in conns:
            await c.close()


async def test_a_claim_skips_rows_a_concurrent_claim_holds(
    migrated: Settings, pg: asyncpg.Connection
) -> None:
    await _market(pg, migrated, gaps_per_token=2)  # 40 gaps
    other = await asyncpg.connect(migrated.pg_dsn)
    try:
        # Another claim's transaction, still open, holding the ten oldest gaps.
        tr = other.transaction()
        await tr.start()
        held = [r[0] for r in await other.fetch(
            "SELECT id FROM sequence_gaps ORDER BY detected_at, id LIMIT 10 FOR UPDATE")]  # fmt: skip
        c = await asyncio.wait_for(
            claim_batches(pg, grace_s=1, batch_size=100, max_batches=5, max_attempts=3), 10
        )  # it does not wait for the other transaction either
        await tr.rollback()
        got = [i for b in c.batches for i in b.gap_ids]
        assert len(got) == 30 and not set(got) & set(held)
    finally:
        await other.close()


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _tick_sensor(settings: Settings, instance: DagsterInstance, barrier: threading.Barrier,
                 out: list[RunRequest | SkipReason]) -> None:  # fmt: skip
    sensor = build_gap_repair_sensor(settings)
    ctx = build_sensor_context(
        instance=instance, resources={"timescale": TimescaleResource(dsn=settings.pg_dsn)}
    )
    barrier.wait(10)
    res = sensor(ctx)
    assert isinstance(res, (list, SkipReason))
    out.extend(res if isinstance(res, list) else [res])


async def test_two_sensor_ticks_at_once_repair_disjoint_batches(
    migrated: Settings, pg: asyncpg.Connection, instance: DagsterInstance
) -> None:
    total = await _market(pg, migrated, gaps_per_token=5)  # 100 gaps over two days
    # Up to four batches of 30 a tick: either tick alone could claim all 100 (two days of 50).
    s = migrated.model_copy(update={"gap_repair_batch_size": 30, "gap_repair_max_runs": 4})
    barrier = threading.Barrier(2)
    outs: list[list[RunRequest | SkipReason]] = [[], []]
    threads = [threading.Thread(target=_tick_sensor, args=(s, instance, barrier, o)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    reqs = [r for o in outs for r in o if isinstance(r, RunRequest)]
    ids = [i for r in reqs for i in r.run_config["ops"]["gap_repair"]["config"]["gap_ids"]]
    assert len(ids) == len(set(ids)), "two ticks claimed the same gap"
    # However the two interleaved, every gap is in exactly one batch.
    assert sorted(ids) == [r[0] for r in await pg.fetch("SELECT id FROM sequence_gaps ORDER BY 1")]
    assert len(ids) == total and len({r.run_key for r in reqs}) == len(reqs)
    # Both runs of the batches, at once: every gap repaired once, nothing claimed after.
    db = TimescaleResource(dsn=migrated.pg_dsn)

    async def run(rr: RunRequest) -> int:
        cfg = rr.run_config["ops"]["gap_repair"]["config"]
        async with db.connect(staging=True) as conn:
            gaps = await claim_for_run(conn, cfg["claim"], gap_ids=cfg["gap_ids"], day=None)
            assert sorted(g.id for g in gaps) == sorted(cfg["gap_ids"])
            outs = await repair_batch(conn, _Source(), gaps, key=cfg["claim"],
                                      today=date(2026, 1, 1), max_attempts=3, concurrency=4)  # fmt: skip
            assert {o.status for o in outs} == {"repaired"}
            return sum(o.inserted for o in outs)

    inserted = await asyncio.gather(*(run(rr) for rr in reqs))
    assert sum(inserted) == total
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE status = 'RECOVERED'") == total
    assert await pg.fetchval("SELECT count(*) FROM sequence_gaps WHERE status <> 'repaired'"
                             " OR claimed_by IS NOT NULL") == 0  # fmt: skip


async def test_requests_to_the_source_are_bounded(
    migrated: Settings, pg: asyncpg.Connection
) -> None:
    await _market(pg, migrated, gaps_per_token=2)  # 40 gaps
    src = _Source(hold=4)
    (b,) = (await claim_batches(pg, grace_s=1, batch_size=100, max_batches=1,
                                max_attempts=3)).batches  # fmt: skip
    await init_connection(pg)
    outs = await repair_batch(
        pg, src, b.gaps, key=b.key, today=date(2026, 1, 1), max_attempts=3, concurrency=4
    )
    # Four in flight at once (the hold proves they overlapped), never more.
    assert src.peak == 4 and src.calls == 20
    assert len(outs) == 20 and {o.status for o in outs} == {"repaired"}


async def test_unrecoverable_after_max_attempts(
    migrated: Settings, pg: asyncpg.Connection, instance: DagsterInstance
) -> None:
    await _market(pg, migrated, gaps_per_token=1)  # 20 gaps
    await init_connection(pg)
    src = _Source(empty=True)
    for attempt in (1, 2, 3):
        c = await claim_batches(pg, grace_s=1, batch_size=100, max_batches=5, max_attempts=3)
        assert [b.trading_day for b in c.batches] == list(DAYS)  # one batch a day
        for b in c.batches:
            assert {g.repair_attempts for g in b.gaps} == {attempt}
            outs = await repair_batch(
                pg, src, b.gaps, key=b.key, today=date(2026, 1, 1), max_attempts=3,
                concurrency=2,
            )  # fmt: skip
            assert {o.status for o in outs} == {"open" if attempt < 3 else "unrecoverable"}
    rows = await pg.fetch("SELECT * FROM sequence_gaps")
    assert {r["status"] for r in rows} == {"unrecoverable"}
    assert all(r["unrecoverable_at"] is not None and r["claimed_by"] is None for r in rows)
    assert all(r["reason"].startswith("after 3 attempts: recovery source returned 0 of 1")
               for r in rows)  # fmt: skip
    # A run that died on its last attempt leaves a claimed, open gap with no attempts left:
    # the sensor frees the claim once it is stale and gives the gap up.
    gid = rows[0]["id"]
    await pg.execute(
        """UPDATE sequence_gaps SET status = 'open', reason = NULL, unrecoverable_at = NULL,
               claimed_by = 'gaps-died', claimed_at = now() - INTERVAL '1 hour' WHERE id = $1""",
        gid,
    )
    s = migrated.model_copy(update={"gap_repair_max_attempts": 3, "gap_repair_grace_s": 1})
    out = build_gap_repair_sensor(s)(
        build_sensor_context(
            instance=instance, resources={"timescale": TimescaleResource(dsn=s.pg_dsn)}
        )
    )
    assert isinstance(out, SkipReason)
    r = await pg.fetchrow("SELECT * FROM sequence_gaps WHERE id = $1", gid)
    assert r is not None and r["status"] == "unrecoverable" and r["claimed_by"] is None
    assert r["reason"] == "after 3 attempts: the last repair run did not finish"


async def test_gap_metrics(migrated: Settings, pg: asyncpg.Connection) -> None:
    await _market(pg, migrated, gaps_per_token=1)  # 20 gaps, detected a minute ago
    m = await gap_metrics(pg)
    assert (m.open, m.claimed, m.unrecoverable_today, m.repaired_today) == (20, 0, 0, 0)
    assert 59 <= m.oldest_open_age_s < 600
    c = await claim_batches(pg, grace_s=1, batch_size=100, max_batches=5, max_attempts=3)
    assert (await gap_metrics(pg)).claimed == 20
    await init_connection(pg)
    await repair_batch(pg, _Source(), c.batches[0].gaps, key=c.batches[0].key,
                       today=date(2026, 1, 1), max_attempts=3, concurrency=2)  # fmt: skip
    await repair_batch(pg, _Source(empty=True), c.batches[1].gaps, key=c.batches[1].key,
                       today=date(2026, 1, 1), max_attempts=1, concurrency=2)  # fmt: skip
    m = await gap_metrics(pg)
    assert (m.open, m.claimed, m.unrecoverable_today, m.repaired_today) == (0, 0, 10, 10)
    assert m.oldest_open_age_s == 0


async def test_a_failed_attempt_waits_for_its_backoff(
    migrated: Settings, pg: asyncpg.Connection
) -> None:
    await _market(pg, migrated, gaps_per_token=1)
    await pg.execute("DELETE FROM sequence_gaps WHERE id <> (SELECT min(id) FROM sequence_gaps)")
    await init_connection(pg)

    async def claim() -> list[int]:
        c = await claim_batches(pg, grace_s=1, batch_size=10, max_batches=1, max_attempts=5,
                                retry_s=30)  # fmt: skip
        for b in c.batches:  # the source is down: the attempt fails
            await repair_batch(pg, _Source(empty=True), b.gaps, key=b.key,
                               today=date(2026, 1, 1), max_attempts=5, concurrency=1)  # fmt: skip
        return [i for b in c.batches for i in b.gap_ids]

    assert len(await claim()) == 1  # attempt 1
    assert await claim() == []  # 30 s not over
    await pg.execute("UPDATE sequence_gaps SET claimed_at = now() - INTERVAL '31 seconds'")
    assert len(await claim()) == 1  # attempt 2
    await pg.execute("UPDATE sequence_gaps SET claimed_at = now() - INTERVAL '59 seconds'")
    assert await claim() == []  # the second wait is 60 s
    await pg.execute("UPDATE sequence_gaps SET claimed_at = now() - INTERVAL '61 seconds'")
    assert len(await claim()) == 1
    assert await pg.fetchval("SELECT repair_attempts FROM sequence_gaps") == 3
