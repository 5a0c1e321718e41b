"""MarketDataProcessor against real Kafka, TimescaleDB and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from nadi.ring import decode_live_entry
from nadi.settings import Settings
from nadi.times import NS
from tests.feedgen import Feed, msg, tick
from tests.kafka_util import produce, read_all, wait_caught_up
from tests.processor_util import (
    private_settings,
    redis_keys,
    reset_state,
    running_worker,
    stored,
)

T1, T2, T3 = 738561, 408065, 2953217


@pytest.fixture
async def env(migrated: Settings, pg: asyncpg.Connection) -> Settings:
    s = await private_settings(migrated)
    await reset_state(pg, s)
    return s


async def _run(s: Settings, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
    produce(s.kafka_bootstrap, s.topic_ticks, messages)
    async with running_worker(s):
        await wait_caught_up(s.kafka_bootstrap, s.group_id, s.topic_ticks)


async def test_feed_duplicates_become_one_row(env: Settings, pg: asyncpg.Connection) -> None:
    feed = Feed(tokens=[T1, T2, T3], n=3000, dup_rate=1.0)
    messages = feed.messages()
    assert len(messages) == 6000
    await _run(env, messages)
    assert await stored(pg) == feed.unique
    assert await pg.fetchval("SELECT count(*) FROM sequence_gaps") == 0
    # The live fan-out carried each tick once, with ring offsets increasing per instrument.
    r = aioredis.from_url(env.redis_url)
    entries: Any = await r.xrange((await redis_keys(env)).live)
    live = [e for _, fields in entries for e in decode_live_entry(fields)]
    await r.aclose()
    assert sorted((e.t.instrument_token, e.t.sequence_id) for e in live) == sorted(
        (tok, seq) for tok, seq, _ in feed.unique
    )
    for token in (T1, T2, T3):
        offsets = [tuple(map(int, e.o.split("-"))) for e in live if e.t.instrument_token == token]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE status <> 'OK'") == 0


async def test_gap_is_recorded_exactly_and_next_tick_is_stale(
    env: Settings, pg: asyncpg.Connection
) -> None:
    t0 = time.time_ns() - 60 * NS
    seqs = [1, 2, 3, 6, 7, 8, 12]
    await _run(env, [msg(tick(T1, s, t0 + s * 1000)) for s in seqs])
    gaps = await pg.fetch("SELECT from_seq, to_seq, status FROM sequence_gaps ORDER BY from_seq")
    assert [(g["from_seq"], g["to_seq"], g["status"]) for g in gaps] == [
        (4, 5, "open"),
        (9, 11, "open"),
    ]
    rows = dict(await pg.fetch("SELECT sequence_id, status FROM ticks ORDER BY sequence_id"))
    assert rows == {1: "OK", 2: "OK", 3: "OK", 6: "STALE", 7: "OK", 8: "OK", 12: "STALE"}


async def test_reordered_tick_is_recovered_and_closes_its_gap(
    env: Settings, pg: asyncpg.Connection
) -> None:
    t0 = time.time_ns() - 60 * NS
    ticks = {s: tick(T2, s, t0 + s * 1000) for s in range(1, 8)}
    # In one batch: 4 before 3.
    await _run(env, [msg(ticks[s]) for s in (1, 2, 4, 3)])
    # Across batches: 7 arrives, then 5 and 6 later in a separate run (database path).
    await _run(env, [msg(ticks[7])])
    assert await pg.fetchval("SELECT status FROM sequence_gaps WHERE from_seq = 5") == "open"
    await _run(env, [msg(ticks[6]), msg(ticks[5])])
    rows = dict(await pg.fetch("SELECT sequence_id, status FROM ticks"))
    assert rows == {
        1: "OK",
        2: "OK",
        4: "STALE",
        3: "RECOVERED",
        7: "STALE",
        6: "RECOVERED",
        5: "RECOVERED",
    }
    gaps = await pg.fetch(
        "SELECT from_seq, to_seq, status, repaired_count FROM sequence_gaps ORDER BY from_seq"
    )
    assert [tuple(g) for g in gaps] == [(3, 3, "repaired", 1), (5, 6, "repaired", 2)]


async def test_sequence_restarts_on_a_new_trading_day(
    env: Settings, pg: asyncpg.Connection
) -> None:
    # 2 days ago and yesterday, 10:00 IST; the second day starts again at 1.
    day = 86_400 * NS
    base = (time.time_ns() // day) * day - 2 * day + (4 * 3600 + 1800) * NS
    first = [msg(tick(T3, s, base + s * 1000)) for s in range(1, 6)]
    second = [msg(tick(T3, s, base + day + s * 1000)) for s in range(1, 4)]
    await _run(env, first + second)
    assert await pg.fetchval("SELECT count(*) FROM sequence_gaps") == 0
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE status = 'OK'") == 8


async def test_conflicting_duplicate_keeps_the_first(env: Settings, pg: asyncpg.Connection) -> None:
    t0 = time.time_ns() - 60 * NS
    a = tick(T1, 1, t0, price=100.0)
    b = tick(T1, 1, t0, price=101.0, feed="B")
    c = tick(T1, 2, t0 + 1000, price=100.5)
    await _run(env, [msg(a, "A"), msg(b, "B"), msg(c, "A")])
    rows = await pg.fetch("SELECT sequence_id, last_price, feed FROM ticks ORDER BY sequence_id")
    assert [tuple(r) for r in rows] == [(1, 100.0, "A"), (2, 100.5, "A")]
    # Later, a conflicting copy with another timestamp (Redis state lost): still the first.
    await reset_redis(env)
    late = tick(T1, 1, t0 + 5, price=99.0, feed="B")
    await _run(env, [msg(late, "B")])
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE sequence_id = 1") == 1


async def reset_redis(s: Settings) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(s.redis_url)
    await r.flushdb()
    await r.aclose()


async def _ring(s: Settings, token: int) -> list[tuple[int, str]]:
    r = aioredis.from_url(s.redis_url)
    entries: Any = await r.xrange((await redis_keys(s)).ring(token))
    await r.aclose()
    out = []
    for _, f in entries:
        d = orjson.loads(f[b"d"])
        out.append((d["sequence_id"], d["status"]))
    return out


async def test_ring_stays_a_tail_of_what_is_stored_after_redis_loses_its_keys(
    env: Settings, pg: asyncpg.Connection
) -> None:
    t0 = time.time_ns() - 60 * NS
    ticks = {s: tick(T3, s, t0 + s * 1000) for s in range(1, 10)}
    await _run(env, [msg(ticks[s]) for s in range(1, 6)])
    assert [q for q, _ in await _ring(env, T3)] == [1, 2, 3, 4, 5]
    await reset_redis(env)  # ring, dedup and sequence state gone; the worker restarts cold
    # A stored tick comes again (a feed-B copy, or a redelivery) ahead of new ones.
    await _run(env, [msg(ticks[3], "B")])
    await _run(env, [msg(ticks[4], "B"), msg(ticks[8]), msg(ticks[9])])
    assert await _ring(env, T3) == [(8, "STALE"), (9, "OK")], "no stored tick behind the restart"
    # A late tick new to the database does reach the ring, with the status it was stored as.
    await _run(env, [msg(ticks[7]), msg(ticks[2], "B")])
    assert await _ring(env, T3) == [(8, "STALE"), (9, "OK"), (7, "RECOVERED")]
    rows = dict(await pg.fetch("SELECT sequence_id, status FROM ticks"))
    assert rows == {
        1: "OK",
        2: "OK",
        3: "OK",
        4: "OK",
        5: "OK",
        7: "RECOVERED",
        8: "STALE",
        9: "OK",
    }
    r = aioredis.from_url(env.redis_url)
    entries: Any = await r.xrange((await redis_keys(env)).live)
    await r.aclose()
    live = [(e.t.sequence_id, e.t.status) for _, f in entries for e in decode_live_entry(f)]
    assert live == [(8, "STALE"), (9, "OK"), (7, "RECOVERED")]


BAD = {
    "bad_json": b'{"instrument_token": 1,',
    "not_object": b"[1, 2, 3]",
    "missing_field": b'{"instrument_token": 738561, "sequence_id": 1, "last_price": 1.0}',
    "wrong_type": b'{"instrument_token": "738561", "sequence_id": 1, "exchange_ts": 1, "last_price": 1.0}',
    "non_finite": b'{"instrument_token": 738561, "sequence_id": 1, "exchange_ts": %d, "last_price": NaN}',
    "out_of_range": b'{"instrument_token": 738561, "sequence_id": -1, "exchange_ts": %d, "last_price": 1.0}',
    "bad_timestamp": b'{"instrument_token": 738561, "sequence_id": 1, "exchange_ts": "2026-01-01T10:00:00", "last_price": 1.0}',
    "future_timestamp": b'{"instrument_token": 738561, "sequence_id": 1, "exchange_ts": %d, "last_price": 1.0}',
    "expired_timestamp": b'{"instrument_token": 738561, "sequence_id": 1, "exchange_ts": 1000000000000000000, "last_price": 1.0}',
    "bad_encoding": b'{"instrument_token": 738561, "name": "\xff\xfe"}',
    "too_large": b'{"instrument_token": 738561, "pad": "' + b"x" * 5000 + b'"}',
    "key_mismatch": b'{"instrument_token": 408065, "sequence_id": 1, "exchange_ts": %d, "last_price": 1.0}',
}


async def test_every_kind_of_bad_input_lands_in_the_dlq(
    env: Settings, pg: asyncpg.Connection
) -> None:
    now = time.time_ns()
    good = [msg(tick(T1, s, now - 10 * NS + s)) for s in (1, 2, 3)]
    bad: list[tuple[bytes | None, bytes]] = []
    for reason, raw in BAD.items():
        value = (
            raw % (now + 3600 * NS)
            if reason == "future_timestamp"
            else raw.replace(b"%d", str(now).encode())
        )
        bad.append((b"738561", value))
    await _run(env, [good[0], *bad, good[1], (None, b"null"), good[2]])
    assert await pg.fetchval("SELECT count(*) FROM ticks") == 3
    dead = await read_all(env.kafka_bootstrap, env.topic_dlq)
    assert len(dead) == len(BAD) + 1
    by_reason: dict[str, bytes] = {}
    for rec in dead:
        h = {k: v for k, v in rec.headers}  # type: ignore[attr-defined]
        assert h["topic"] == env.topic_ticks.encode()
        assert int(h["offset"]) >= 0 and int(h["partition"]) >= 0 and h["detail"]
        by_reason[h["reason"].decode()] = rec.value  # type: ignore[attr-defined]
    assert set(BAD) <= set(by_reason)
    assert by_reason["bad_encoding"] == BAD["bad_encoding"]  # original bytes, untouched


async def test_two_workers_split_partitions_with_the_same_result(
    env: Settings, pg: asyncpg.Connection
) -> None:
    tokens = [T1, T2, T3, 341249, 1270529, 779521, 424961, 2714625]
    feed = Feed(tokens=tokens, n=20_000, dup_rate=0.5, gap_rate=0.01)
    async with running_worker(env) as w1, running_worker(env) as w2:
        for _ in range(200):  # both members in the group before any data flows
            if w1.assigned and w2.assigned and len(w1.assigned | w2.assigned) == 4:
                break
            await asyncio.sleep(0.1)
        assert not w1.assigned & w2.assigned
        await asyncio.to_thread(produce, env.kafka_bootstrap, env.topic_ticks, feed.messages())
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks)
        assert w1.committed_records > 0 and w2.committed_records > 0, (
            "both workers must share the work"
        )
    assert await stored(pg) == feed.unique
    expected_gaps = sum(len(v) for v in feed.dropped.values())
    missing = await pg.fetchval("SELECT coalesce(sum(to_seq - from_seq + 1), 0) FROM sequence_gaps")
    # Gaps at the very end of a token's stream are not visible yet (no later tick).
    assert 0 < missing <= expected_gaps


# ---- state that cannot outlive its database (DESIGN.md section 9) ---------------------------

TOKENS = [T1, T2, T3, 341249]


def _metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _assert_exact(s: Settings, pg: asyncpg.Connection, feed: Feed) -> None:
    """Every tick once, gaps exactly the dropped sequences, one STALE per gap, and each ring a
    duplicate-free tail of its stored ticks."""
    assert await stored(pg) == feed.unique
    assert await pg.fetchval("SELECT count(*) FROM ticks") == len(feed.unique)
    gaps = await pg.fetch("SELECT instrument_token, from_seq, to_seq, status FROM sequence_gaps")
    holes = {(g[0], q) for g in gaps if g[3] == "open" for q in range(g[1], g[2] + 1)}
    last = {t: max(q for tok, q, _ in feed.unique if tok == t) for t in TOKENS}
    dropped = {(t, q) for t, qs in feed.dropped.items() for q in qs if q < last[t]}
    stored_seqs = {(tok, q) for tok, q, _ in feed.unique}
    assert holes - stored_seqs == dropped, "no false gap, no missed gap"
    repaired = {(g[0], q) for g in gaps if g[3] == "repaired" for q in range(g[1], g[2] + 1)}
    assert repaired <= feed.reordered
    assert await pg.fetchval("SELECT count(*) FROM ticks WHERE status = 'STALE'") == len(gaps)
    for token in TOKENS:
        seqs = [q for q, _ in await _ring(s, token)]
        assert len(seqs) == len(set(seqs)), f"ring of {token} has duplicates"
        expected = sorted(q for tok, q, _ in feed.unique if tok == token)
        assert sorted(seqs) == expected[len(expected) - len(seqs) :], f"ring of {token}"


async def test_fresh_database_with_redis_full_of_another_databases_state(
    env: Settings, pg: asyncpg.Connection
) -> None:
    feed = Feed(tokens=TOKENS, n=3000, dup_rate=0.3, gap_rate=0.01, reorder_rate=0.02, seed=3)
    messages = feed.messages()
    await _run(env, messages)
    await _assert_exact(env, pg, feed)
    # The database is replaced by a fresh one (a new identity, no rows) while Redis keeps the
    # old database's rings, and the old un-namespaced layout is there too.
    r = aioredis.from_url(env.redis_url)
    await r.set("nadi:live", b"x")
    await r.aclose()
    await pg.execute("TRUNCATE ticks, sequence_gaps, candle_dirty, ingest_state")
    await pg.execute("UPDATE nadi_instance SET id = gen_random_uuid()")
    other = _metric("nadi_redis_state_discarded_total", reason="other_database")
    legacy = _metric("nadi_redis_state_discarded_total", reason="legacy_keys")
    again = env.model_copy(update={"group_id": env.group_id + "-b"})  # the topic from the start
    async with running_worker(again):
        await wait_caught_up(again.kafka_bootstrap, again.group_id, again.topic_ticks)
    await _assert_exact(again, pg, feed)
    assert _metric("nadi_redis_state_discarded_total", reason="other_database") == other + 1
    assert _metric("nadi_redis_state_discarded_total", reason="legacy_keys") == legacy + 1


async def test_database_restored_from_a_dump_taken_mid_stream(
    env: Settings, pg: asyncpg.Connection
) -> None:
    feed = Feed(tokens=TOKENS, n=4000, dup_rate=0.3, gap_rate=0.01, reorder_rate=0.02, seed=4)
    messages = feed.messages()
    half = len(messages) // 2
    await _run(env, messages[:half])
    tables = ("ticks", "sequence_gaps", "ingest_state")
    for t in tables:  # the dump: a consistent copy of the data, identity included
        await pg.execute(f"CREATE TABLE dump_{t} AS SELECT * FROM {t}")
    await _run(env, messages[half:])
    try:
        async with pg.transaction():  # the restore
            await pg.execute("TRUNCATE ticks, sequence_gaps, ingest_state")
            for t in tables:
                await pg.execute(f"INSERT INTO {t} SELECT * FROM dump_{t}")
    finally:
        for t in tables:
            await pg.execute(f"DROP TABLE dump_{t}")
    assert await pg.fetchval("SELECT count(*) FROM ticks") < len(feed.unique)
    # Offsets reset to before the dump (a new group reads from the start); Redis is newer than
    # the database: its rings are kept and take nothing twice.
    again = env.model_copy(update={"group_id": env.group_id + "-b"})
    async with running_worker(again):
        await wait_caught_up(again.kafka_bootstrap, again.group_id, again.topic_ticks)
    await _assert_exact(again, pg, feed)


@pytest.mark.parametrize("fault", ["older_snapshot", "flushed"])
async def test_redis_older_than_the_database(
    env: Settings, pg: asyncpg.Connection, fault: str
) -> None:
    feed = Feed(tokens=TOKENS, n=4500, dup_rate=0.3, gap_rate=0.01, seed=5)
    messages = feed.messages()
    third = len(messages) // 3
    await _run(env, messages[:third])
    r = aioredis.from_url(env.redis_url)
    snapshot = {k: await r.dump(k) for k in await r.keys("*")}
    await _run(env, messages[third : 2 * third])
    await r.flushdb()
    if fault == "older_snapshot":  # Redis restarted from an RDB snapshot taken earlier
        for k, v in snapshot.items():
            assert v is not None
            await r.restore(k, 0, v)
    await r.aclose()
    reason = "ring_behind" if fault == "older_snapshot" else "ring_lost"
    before = _metric("nadi_redis_state_discarded_total", reason=reason)
    await _run(env, messages[2 * third :])
    await _assert_exact(env, pg, feed)
    assert _metric("nadi_redis_state_discarded_total", reason=reason) >= before + len(TOKENS)


async def test_database_refuses_a_batch_classified_against_a_stale_state(
    env: Settings, pg: asyncpg.Connection
) -> None:
    from nadi.db.tick_writer import init_connection, write_batch

    t0 = time.time_ns() - 60 * NS
    t = {q: tick(T1, q, t0 + q * 1000) for q in range(1, 11)}
    day = t[1].trading_day_ordinal
    moved = _metric("nadi_ingest_state_moved_total")
    produce(env.kafka_bootstrap, env.topic_ticks, [msg(t[q]) for q in range(1, 6)])
    async with running_worker(env):
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks)
        # Another writer (a zombie, say) stores 6..8 behind the worker's back.
        await init_connection(pg)
        await write_batch(pg, [t[6], t[7], t[8]], [day] * 3, ["OK"] * 3, [], mark_dirty=True)
        produce(env.kafka_bootstrap, env.topic_ticks, [msg(t[9]), msg(t[10])])
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks)
    rows = dict(await pg.fetch("SELECT sequence_id, status FROM ticks"))
    assert rows == dict.fromkeys(range(1, 11), "OK"), "no false gap, no false STALE"
    assert await pg.fetchval("SELECT count(*) FROM sequence_gaps") == 0
    assert _metric("nadi_ingest_state_moved_total") == moved + 1


async def test_killed_after_the_database_commit_the_ring_takes_no_tick_twice(
    env: Settings, pg: asyncpg.Connection, tmp_path: Any
) -> None:
    """The CI failure of issue 8 ("ring ... is not the tail of its ticks"): after a crash,
    redelivered ticks and their feed-B copies are LATE against the database's state; the
    ring's appended-sequence bitmap keeps every one of them out (it used to re-append those
    that had gone in in order)."""
    from tests.processor_util import spawn_worker

    feed = Feed(tokens=TOKENS, n=12_000, dup_rate=0.3, gap_rate=0.005, reorder_rate=0.01, seed=9)
    produce(env.kafka_bootstrap, env.topic_ticks, feed.messages())
    log = str(tmp_path / "worker.log")
    small = env.model_copy(update={"batch_max_records": 1000})  # several commits to crash at
    first = spawn_worker(small, log, fault="after_db_commit:2")
    assert await asyncio.to_thread(first.wait, 60) == -9, "the crash point was not reached"
    assert 0 < await pg.fetchval("SELECT count(*) FROM ticks") < len(feed.unique)
    second = spawn_worker(small, log)
    try:
        await wait_caught_up(env.kafka_bootstrap, env.group_id, env.topic_ticks, timeout_s=60)
    finally:
        second.terminate()
        assert await asyncio.to_thread(second.wait, 30) == 0
    await _assert_exact(env, pg, feed)
