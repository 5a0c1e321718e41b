"""`nadi bench ingest`: one MarketDataProcessor from a pre-filled topic to committed rows,
next to a raw binary COPY + INSERT … ON CONFLICT of the same unique ticks into an empty
hypertable of the same shape, measured in the same run (the machine is shared and noisy, so
the ratio is the figure that travels)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import asyncpg
import psutil
from confluent_kafka import Producer

from bench import common
from nadi.codec import encode
from nadi.kafka_admin import group_offsets
from nadi.kafka_produce import produce_waiting
from nadi.settings import Settings
from nadi.tick import TICK_COLUMNS, Tick
from nadi.times import EPOCH, NS

TOKENS = [738561 + 256 * i for i in range(80)]  # 80 instruments, Kite-style NSE tokens


def make_ticks(n_unique: int, seed: int = 1) -> list[Tick]:
    """``n_unique`` valid ticks over the last hour, in sequence per instrument."""
    rng = random.Random(seed)
    start = time.time_ns() - 3600 * NS
    seq = dict.fromkeys(TOKENS, 0)
    price = {t: 100.0 + (t % 997) for t in TOKENS}
    out = []
    for i in range(n_unique):
        tok = TOKENS[i % len(TOKENS)] if i % 3 else rng.choice(TOKENS)
        seq[tok] += 1
        price[tok] = max(1.0, round(price[tok] + rng.choice((-0.05, 0.0, 0.05)), 2))
        qty = rng.randint(1, 500)
        out.append(
            Tick(
                tok,
                seq[tok],
                start + i * 3000,
                price[tok],
                "NSE",
                qty,
                seq[tok] * 250,
                None,
                round(price[tok] - 0.05, 2),
                round(price[tok] + 0.05, 2),
                100,
                120,
                "A",
            )
        )
    return out


def fill_topic(s: Settings, ticks: list[Tick], dup_rate: float, seed: int = 2) -> int:
    """Produce every tick on feed A and ``dup_rate`` of them again on feed B; returns messages."""
    rng = random.Random(seed)
    p = Producer(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "acks": "all",
            "enable.idempotence": True,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    n = 0
    for t in ticks:
        key = str(t.instrument_token).encode()
        for feed in ("A", "B") if rng.random() < dup_rate else ("A",):
            produce_waiting(p, s.topic_ticks, encode(t, feed), key, wait_s=0.01)
            n += 1
        if n % 20_000 == 0:
            p.poll(0)
    if p.flush(120) != 0:
        raise RuntimeError("the bench topic was not filled completely")
    return n


def _caught_up(ends: dict[int, int], done: dict[int, int]) -> bool:
    return all(done.get(p, -1) >= end for p, end in ends.items())


async def raw_write(s: Settings, ticks: list[Tick], batch: int) -> float:
    """Seconds to COPY + INSERT … ON CONFLICT DO NOTHING ``ticks`` into an empty hypertable."""
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        await conn.execute(common.RAW_BENCH_TABLE)
        await conn.execute(
            "CREATE TEMP TABLE raw_stage (LIKE ticks_raw_bench) ON COMMIT DELETE ROWS"
        )
        from datetime import UTC, datetime, timedelta

        epoch = EPOCH
        cols = (*TICK_COLUMNS, "ingest_ts")
        now = datetime.now(UTC)
        t0 = time.perf_counter()
        for i in range(0, len(ticks), batch):
            records = [
                (
                    t.instrument_token,
                    epoch + timedelta(microseconds=t.exchange_ts // 1000),
                    t.sequence_id,
                    t.last_price,
                    t.last_qty,
                    t.volume,
                    t.oi,
                    t.bid,
                    t.ask,
                    t.bid_qty,
                    t.ask_qty,
                    "OK",
                    t.feed,
                    now,
                )
                for t in ticks[i : i + batch]
            ]
            async with conn.transaction():
                await conn.copy_records_to_table("raw_stage", records=records, columns=cols)
                await conn.execute(
                    "INSERT INTO ticks_raw_bench SELECT * FROM raw_stage ON CONFLICT DO NOTHING"
                )
        seconds = time.perf_counter() - t0
        stored = await conn.fetchval("SELECT count(*) FROM ticks_raw_bench")
        assert stored == len(ticks), (stored, len(ticks))
        await conn.execute("DROP TABLE ticks_raw_bench")
        return seconds
    finally:
        await conn.close()


def _service_cpu() -> dict[str, float]:
    """CPU seconds used so far by PostgreSQL, Redis and Kafka processes on this machine."""
    groups = {"postgres": "postgres", "redis-server": "redis", "java": "kafka"}
    out: dict[str, float] = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        name = groups.get(p.info["name"] or "")
        if name and p.info["cpu_times"] is not None:
            t = p.info["cpu_times"]
            out[name] = out.get(name, 0.0) + t.user + t.system
    return out


async def run(base: Settings, n: int, dup_rate: float, batch: int) -> dict[str, object]:
    s = common.bench_settings(base, "ingest").model_copy(update={"batch_max_records": batch})
    await common.fresh_database(s)
    await common.create_topics(s, (s.topic_ticks, 12), (s.topic_dlq, 1))
    try:
        n_unique = round(n / (1 + dup_rate))
        ticks = make_ticks(n_unique)
        t_fill = time.perf_counter()
        messages = await asyncio.to_thread(fill_topic, s, ticks, dup_rate)
        fill_s = time.perf_counter() - t_fill
        ends, _ = await asyncio.to_thread(
            group_offsets, s.kafka_bootstrap, s.group_id, s.topic_ticks
        )
        assert sum(ends.values()) == messages

        log = s.home / "bench" / "ingest-worker.log"
        cpu_before = _service_cpu()
        t0 = time.perf_counter()
        worker = common.spawn(["process"], common.worker_env(s), Path(log))
        rss = common.PeakRss(worker.pid)
        rss.start()
        while not _caught_up(
            ends,
            (await asyncio.to_thread(group_offsets, s.kafka_bootstrap, s.group_id, s.topic_ticks))[
                1
            ],
        ):
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}; see {log}")
            await asyncio.sleep(0.1)
        seconds = time.perf_counter() - t0
        cpu_after = _service_cpu()
        worker_cpu = psutil.Process(worker.pid).cpu_times()
        await rss.stop()
        worker.terminate()
        worker.wait(30)

        conn = await asyncpg.connect(s.pg_dsn)
        stored = await conn.fetchval("SELECT count(*) FROM ticks")
        await conn.close()
        if stored != n_unique:
            raise RuntimeError(f"stored {stored} rows, expected {n_unique}")
        raw_s = await raw_write(s, ticks, batch)
        return {
            "messages": messages,
            "unique_ticks": n_unique,
            "dup_rate": dup_rate,
            "batch": batch,
            "seconds": round(seconds, 2),
            "ticks_per_s": round(messages / seconds),
            "unique_ticks_per_s": round(n_unique / seconds),
            "raw_seconds": round(raw_s, 2),
            "raw_ticks_per_s": round(n_unique / raw_s),
            "ratio_to_raw": round(raw_s / seconds, 3),
            "peak_rss_mb": rss.peak_mb,
            "producer_ticks_per_s": round(messages / fill_s),
            # Where the time goes: CPU seconds per process group during the worker's run.
            "cpu_s": {
                "worker": round(worker_cpu.user + worker_cpu.system, 1),
                **{k: round(cpu_after.get(k, 0) - cpu_before.get(k, 0), 1) for k in cpu_after},
            },
        }
    finally:
        await common.delete_topics(s, s.topic_ticks, s.topic_dlq)
