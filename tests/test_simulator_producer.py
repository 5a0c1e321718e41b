"""The producer really delivers to Kafka, and `nadi simulate` runs end to end (real broker)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import date

import typer
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from typer.testing import CliRunner

from nadi.instruments import bundled_instruments
from nadi.settings import Settings
from streaming.simulator.cli import simulate
from streaming.simulator.feed import FeedSimulator
from streaming.simulator.generator import DayGenerator
from streaming.simulator.producer import TickProducer

DAY = date(2026, 11, 20)


async def _topic(bootstrap: str, partitions: int = 3) -> str:
    name = f"test.sim.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=name, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    return name


async def _read_all(
    bootstrap: str, topic: str, n: int, timeout_s: float = 30
) -> list[tuple[bytes, bytes]]:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         enable_auto_commit=False, group_id=None)  # fmt: skip
    await c.start()
    out: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < n:
                batch = await c.getmany(timeout_ms=500)
                for recs in batch.values():
                    out.extend((r.key or b"", r.value or b"") for r in recs)
        # nothing beyond what was produced
        extra = await c.getmany(timeout_ms=300)
        out.extend((r.key or b"", r.value or b"") for recs in extra.values() for r in recs)
    finally:
        await c.stop()
    return out


async def test_producer_delivers_every_message(settings: Settings) -> None:
    topic = await _topic(settings.kafka_bootstrap)
    insts = bundled_instruments(DAY)[:10]
    gen = DayGenerator(insts, 4, DAY, density=5.0)
    feed = FeedSimulator(4, DAY, gap_rate=0.01, reorder_rate=0.01, bad_rate=0.01)
    msgs = list(feed.messages(gen.stream(max_ticks=3000)))
    prod = TickProducer(settings.kafka_bootstrap, topic)
    assert prod.send(msgs) == len(msgs)
    assert prod.close() == 0 and prod.stats.failed == 0 and prod.stats.delivered == len(msgs)
    got = await _read_all(settings.kafka_bootstrap, topic, len(msgs))
    assert Counter(got) == Counter((m.key, m.value) for m in msgs)


async def test_rate_pacing_holds_back(settings: Settings) -> None:
    topic = await _topic(settings.kafka_bootstrap, 1)
    gen = DayGenerator(bundled_instruments(DAY)[:3], 4, DAY, density=5.0)
    msgs = list(FeedSimulator(4, DAY, dup_rate=0.0).messages(gen.stream(max_ticks=640)))
    prod = TickProducer(settings.kafka_bootstrap, topic)
    t0 = asyncio.get_running_loop().time()
    await asyncio.to_thread(prod.send, msgs, rate=1000.0)
    elapsed = asyncio.get_running_loop().time() - t0
    assert prod.close() == 0
    assert 0.5 < elapsed < 3.0  # 640 ticks at 1000/s


async def test_simulate_cli_session_day_end_to_end(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    topic = await _topic(settings.kafka_bootstrap)
    app = typer.Typer()
    app.command("simulate")(simulate)
    app.command("noop")(lambda: None)  # two commands: typer keeps the verb
    args = ["simulate", "--session-date", "2026-11-20", "--instruments", "RELIANCE,INFY,738561",
            "--max-ticks", "2000", "--topic", topic, "--recovery-port", "0", "--no-load-instruments",
            "--gap-rate", "0.01", "--bad-rate", "0.02", "--seed", "9", "--bhavcopy-dir", str(tmp_path)]  # fmt: skip
    r = await asyncio.to_thread(CliRunner().invoke, app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["mode"] == "session" and summary["ticks_generated"] == 2000
    n = summary["messages_sent"]["A"] + summary["messages_sent"]["B"]
    assert summary["delivered"] == n and summary["failed"] == 0 and summary["gaps"] > 0
    assert sum(summary["bad"].values()) > 10
    got = await _read_all(settings.kafka_bootstrap, topic, n)
    assert len(got) == n
    assert {k for k, _ in got} <= {b"738561", b"408065", b"738562", b"408066"}
    for seg in ("CM", "FO"):  # the day's two zipped UDiFF files
        assert (tmp_path / f"BhavCopy_NSE_{seg}_0_0_0_20261120_F_0000.csv.zip").exists()
    r = await asyncio.to_thread(
        CliRunner().invoke, app, ["simulate", "--session-date", "2026-11-24", "--topic", topic]
    )
    assert r.exit_code != 0 and "not an NSE trading day" in r.output
