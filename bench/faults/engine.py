"""The fault-matrix engine: one row = a stream through N real ``nadi process`` workers, a
fault, a wait until the group has caught up, and a comparison with what was sent.

Figures of a row (``nadi bench faults`` prints them, the tests assert on them):
- ``sent`` messages produced (feed duplicates and bad messages included), ``unique`` valid
  ticks among them, ``stored`` rows in ``ticks``;
- ``missing`` valid ticks not stored, ``duplicates`` rows beyond one per tick (or not sent);
- ``false_gaps`` sequences recorded missing (open gaps) that were sent, ``missed_gaps``
  holes of the feed not recorded as open gaps;
- ``false_stale`` ticks flagged STALE that followed no gap, ``missed_stale`` ticks after a
  gap not flagged, ``status_mismatch`` ticks whose status (OK/STALE/RECOVERED) is not the
  feed's;
- ``ring_duplicates`` ticks twice in their instrument's ring, ``ring_not_tail`` instruments
  whose ring is not a gap-free tail of their stored ticks (or is empty), ``ring_entries``,
  ``ring_short`` stored ticks a ring lacks below its length (a problem unless Redis lost data);
- ``dlq`` messages on the DLQ, ``dlq_unique`` distinct by their source topic/partition/offset
  headers, ``dlq_missing`` bad messages that never reached it, ``bad`` bad messages sent;
- ``recovery_s`` seconds from the end of the fault until the group had caught up.
A row passes when ``problems`` is empty; each problem names the figure and the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from bench import common
from bench.faults.stack import FaultStack
from bench.faults.stream import Stream, generate
from nadi.kafka_admin import group_offsets
from nadi.kafka_produce import produce_waiting
from nadi.redis_keys import RedisKeys
from nadi.settings import Settings

STALE = "STALE"


def nadi_script() -> str:
    """The ``nadi`` console script of this environment (the real entry point)."""
    script = Path(sys.executable).parent / "nadi"
    if not script.exists():
        raise RuntimeError(f"the nadi console script is not installed next to {sys.executable}")
    return str(script)


def service_env(s: Settings) -> dict[str, str]:
    """A worker's environment (bench.common.worker_env) that also finds the local services."""
    return {**common.worker_env(s), "NADI_HOME": str(s.home)}


class Workers:
    """The row's ``nadi process`` subprocesses (logs under the row's directory)."""

    def __init__(self, s: Settings, logs: Path) -> None:
        self.s = s
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.spawned = 0
        self.exits: list[int] = []  # return codes of workers that ended (killed included)

    def spawn(self, fault: str | None = None) -> subprocess.Popen[bytes]:
        env = service_env(self.s)
        env.pop("NADI_FAULT", None)
        if fault:
            env["NADI_FAULT"] = fault
        self.spawned += 1
        log = (self.logs / f"worker{self.spawned}.log").open("ab")
        p = subprocess.Popen(
            [nadi_script(), "process"], env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        self.procs.append(p)
        return p

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def reap(self) -> list[subprocess.Popen[bytes]]:
        """Forget workers that ended; returns them."""
        gone = [p for p in self.procs if p.poll() is not None]
        for p in gone:
            self.procs.remove(p)
            assert p.returncode is not None
            self.exits.append(p.returncode)
        return gone

    def kill(self, p: subprocess.Popen[bytes]) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        self.reap()

    def stop_all(self, timeout_s: float = 60) -> list[int]:
        """SIGTERM every worker (SIGCONT first: a stopped one cannot exit); return codes."""
        for p in self.alive():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in list(self.procs):
            try:
                codes.append(p.wait(timeout_s))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait(10))
                codes[-1] = -999  # did not stop on SIGTERM
        self.procs.clear()
        return codes

    def tail(self, chars: int = 3000) -> str:
        out = []
        for f in sorted(self.logs.glob("worker*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)


class PacedProducer:
    """Produces the stream in the background at a steady rate (the load), counting acks."""

    def __init__(self, s: Settings, messages: list[tuple[bytes | None, bytes]], seconds: float):
        self.s = s
        self.messages = messages
        self.seconds = seconds
        self.acked = 0
        self.errors: list[str] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.acked += 1

    def _run(self) -> None:
        p = Producer(
            {
                "bootstrap.servers": self.s.kafka_bootstrap,
                "linger.ms": 5,
                "acks": "all",
                "enable.idempotence": True,
                "message.timeout.ms": 300_000,
            }
        )
        chunk = 250
        t0 = time.monotonic()
        try:
            for i in range(0, len(self.messages), chunk):
                for key, value in self.messages[i : i + chunk]:
                    produce_waiting(p, self.s.topic_ticks, value, key, self._on_delivery)
                p.poll(0)
                # Pacing (the load's rate), not synchronisation.
                due = t0 + self.seconds * (i + chunk) / len(self.messages)
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            left = p.flush(300)
            if left:
                self.errors.append(f"{left} messages never acknowledged")
        finally:
            self.done.set()

    async def reached(self, fraction: float, timeout_s: float = 300) -> None:
        """Until ``fraction`` of the stream is acknowledged."""
        target = int(len(self.messages) * fraction)
        deadline = time.monotonic() + timeout_s
        while self.acked < target:
            if self.done.is_set() or time.monotonic() > deadline:
                raise AssertionError(
                    f"producer stopped at {self.acked}/{target}: {self.errors[:3]}"
                )
            await asyncio.sleep(0.02)

    async def finished(self, timeout_s: float = 600) -> None:
        if not await asyncio.to_thread(self.done.wait, timeout_s):
            raise AssertionError("producer did not finish")


@dataclass
class Run:
    """What a row's fault gets to work with."""

    stack: FaultStack
    s: Settings  # the row's settings, direct to the services
    ws: Settings  # what the workers use (direct, or through Toxiproxy)
    stream: Stream
    workers: Workers
    producer: PacedProducer
    dir: Path
    n: int
    fault_end: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    recovery: asyncio.Task[float] | None = None
    state: dict[str, object] = field(default_factory=dict)  # a row's own objects

    def end_fault(self) -> None:
        """The fault is over: ``recovery_s`` runs from now until the group has committed
        everything that was in the topic at this moment."""
        self.fault_end = time.monotonic()
        self.recovery = asyncio.create_task(self._recover(self.fault_end))

    async def _recover(self, t0: float) -> float:
        budget = 180 + self.n / 1000
        ends: dict[int, int] = {}
        while not ends:  # the broker may be coming back
            with contextlib.suppress(Exception):
                ends, _ = await asyncio.to_thread(
                    group_offsets, self.s.kafka_bootstrap, self.s.group_id, self.s.topic_ticks
                )
            if time.monotonic() - t0 > budget:
                raise AssertionError("the topic's end offsets stayed unreadable after the fault")
        await wait_caught_up(self.s, budget - (time.monotonic() - t0), ends)
        return time.monotonic() - t0

    async def caught_up(self, timeout_s: float) -> float:
        """Until the group has committed every partition's end; returns when (monotonic)."""
        await wait_caught_up(self.s, timeout_s)
        return time.monotonic()


async def wait_caught_up(
    s: Settings, timeout_s: float, targets: dict[int, int] | None = None
) -> None:
    """Until the group has committed every partition's end offset (or ``targets``)."""
    deadline = time.monotonic() + timeout_s
    ends: dict[int, int] = {}
    done: dict[int, int] = {}
    last_error = ""
    while time.monotonic() < deadline:
        try:
            ends, done = await asyncio.to_thread(
                group_offsets, s.kafka_bootstrap, s.group_id, s.topic_ticks
            )
        except Exception as e:  # the broker may be the thing that is down
            last_error = repr(e)[:200]
        else:
            want = targets if targets is not None else ends
            if ends and all(done.get(p, -1) >= end for p, end in want.items() if end > 0):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"group {s.group_id} did not catch up within {timeout_s:.0f}s: committed {done} "
        f"vs ends {ends} {last_error}"
    )


async def wait_until(
    cond: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def group_members(s: Settings) -> list[set[int]]:
    """The partitions of each member of the row's group (blocking: call from a thread)."""
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    desc = admin.describe_consumer_groups([s.group_id])[s.group_id].result(timeout=10)
    return [{tp.partition for tp in m.assignment.topic_partitions} for m in desc.members]


async def group_formed(s: Settings, members: int, partitions: int) -> bool:
    """``members`` consumers in the group sharing every partition (a stable assignment)."""
    try:
        got = await asyncio.to_thread(group_members, s)
    except Exception:
        return False
    everything = set().union(*got) if got else set()
    return len(got) == members and everything == set(range(partitions))


Fault = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True)
class Row:
    """One row of the matrix. ``fault`` runs while the stream flows and ends with
    ``run.end_fault()``; ``workers`` are started before it (the first with ``first_env``)."""

    name: str
    fault: Fault
    workers: int = 2
    proxied: bool = False  # workers reach the services through Toxiproxy
    first_fault: str | None = None  # NADI_FAULT of the first worker
    stream_s: float = 8.0  # seconds the stream takes at the reduced size (scaled with n)
    partitions: int = 6
    check: Callable[[Run, dict[str, Any]], None] | None = None  # extra row checks
    redis_kept: bool = True  # Redis keeps its data: each ring holds all its stored ticks
    after: Fault | None = None  # runs once the group caught up (or the row failed)


async def run_row(stack: FaultStack, row: Row, n: int, *, seed: int = 1) -> dict[str, Any]:
    """Run one row from a clean database, Redis and topics; returns its figures."""
    t_start = time.monotonic()
    await stack.fresh_database()
    await stack.flush_redis()
    assert stack.toxics is not None
    stack.toxics.reset()
    s = await stack.create_topics(row.name, row.partitions)
    ws = stack.proxied(s) if row.proxied else s
    rowdir = stack.home / "rows" / row.name
    rowdir.mkdir(parents=True, exist_ok=True)
    for old in rowdir.glob("worker*.log"):
        old.unlink()
    stream = generate(n, seed=seed)
    seconds = row.stream_s * max(1.0, n / 20_000) ** 0.5  # full size: longer and denser
    run = Run(
        stack=stack,
        s=s,
        ws=ws,
        stream=stream,
        workers=Workers(ws, rowdir),
        producer=PacedProducer(s, stream.messages, seconds),
        dir=rowdir,
        n=n,
    )
    recovery_s: float | None = None
    try:
        for i in range(row.workers):
            run.workers.spawn(row.first_fault if i == 0 else None)
        # The stream starts once every worker is in the group (a worker's start-up takes
        # seconds on a loaded machine; a fault before it would hit nothing).
        await wait_until(
            lambda: group_formed(s, row.workers, row.partitions),
            120,
            f"{row.workers} workers to join the group",
        )
        run.producer.start()
        await row.fault(run)
        if run.fault_end is None:
            run.end_fault()
        await run.producer.finished()
        await run.caught_up(timeout_s=180 + n / 1000)
        assert run.recovery is not None
        recovery_s = round(await run.recovery, 2)
        if run.producer.errors:
            run.problems.append(f"producer: {run.producer.errors[:3]}")
    except Exception as e:
        run.problems.append(f"{type(e).__name__}: {e}")
    finally:
        if row.after is not None:
            try:
                await row.after(run)
            except Exception as e:
                run.problems.append(f"{type(e).__name__}: {e}")
        if run.recovery is not None and not run.recovery.done():
            run.recovery.cancel()
        # A row that failed half-way may have left a service down: heal first, so the
        # workers can drain and leave the group on SIGTERM.
        await stack.heal()
        codes = run.workers.stop_all()
    if any(c != 0 for c in codes):
        run.problems.append(f"workers did not stop cleanly on SIGTERM: return codes {codes}")
    figures = await measure(run)
    figures["recovery_s"] = recovery_s
    figures["row_s"] = round(time.monotonic() - t_start, 1)
    figures.update(run.notes)
    if row.check is not None:
        row.check(run, figures)
    expect_zero = (
        "missing", "duplicates", "false_gaps", "missed_gaps", "false_stale", "missed_stale",
        "status_mismatch", "ring_duplicates", "ring_not_tail", "dlq_missing",
    )  # fmt: skip
    for k in expect_zero:
        if figures[k]:
            run.problems.append(f"{k} = {figures[k]}")
    if figures["dlq_unique"] != figures["bad"]:
        run.problems.append(f"dlq_unique = {figures['dlq_unique']}, bad = {figures['bad']}")
    if row.redis_kept and figures["ring_short"]:
        run.problems.append(f"ring_short = {figures['ring_short']} (Redis kept its data)")
    if figures["dlq"] < figures["bad"]:  # at-least-once: redelivery may dead-letter again
        run.problems.append(f"dlq = {figures['dlq']} < bad = {figures['bad']}")
    if figures["stored"] != figures["unique"]:
        run.problems.append(f"stored = {figures['stored']}, unique = {figures['unique']}")
    figures = {"row": row.name, **figures, "problems": run.problems}
    if run.problems:
        (rowdir / "workers-tail.txt").write_text(run.workers.tail())
        figures["logs"] = str(rowdir)
    with contextlib.suppress(Exception):
        await stack.delete_topics(s)
    return figures


async def measure(run: Run) -> dict[str, Any]:
    s, stream = run.s, run.stream
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT instrument_token, sequence_id,"
            " (extract(epoch FROM exchange_ts) * 1000000)::bigint, status FROM ticks"
        )
        gaps = await conn.fetch(
            "SELECT instrument_token, from_seq, to_seq, status FROM sequence_gaps"
        )
    finally:
        await conn.close()
    stored: dict[tuple[int, int], tuple[int, str]] = {}
    duplicates = 0
    for token, seq, ts_us, status in rows:
        key = (token, seq)
        if key in stored or stream.expected.get(key, (None,))[0] != ts_us:
            duplicates += 1  # a second row, or one that was never sent
        stored.setdefault(key, (ts_us, status))
    missing = sum(1 for k in stream.expected if k not in stored)
    open_seqs = {(g[0], q) for g in gaps if g[3] == "open" for q in range(g[1], g[2] + 1)}
    stale = {k for k, (_, st) in stored.items() if st == STALE}
    want_stale = {k for k, (_, st) in stream.expected.items() if st == STALE}
    mismatch = sum(
        1 for k, (_, st) in stream.expected.items() if k in stored and stored[k][1] != st
    )
    figures: dict[str, Any] = {
        "sent": stream.sent,
        "unique": len(stream.expected),
        "stored": len(rows),
        "missing": missing,
        "duplicates": duplicates,
        "false_gaps": len(open_seqs - stream.holes),
        "missed_gaps": len(stream.holes - open_seqs),
        "false_stale": len(stale - want_stale),
        "missed_stale": len(want_stale - stale),
        "status_mismatch": mismatch,
        "holes": len(stream.holes),
        "reorders": stream.reorders,
        "feed_duplicates": stream.duplicates,
    }
    figures.update(await ring_figures(s, stored, await ring_names(s)))
    figures.update(await dlq_figures(s, stream))
    return figures


async def ring_names(s: Settings) -> Callable[[int], str]:
    """token -> its ring's key (namespaced by the database's identity)."""
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        keys = await RedisKeys.load(conn)
    finally:
        await conn.close()
    return keys.ring


async def ring_figures(
    s: Settings, stored: dict[tuple[int, int], tuple[int, str]], ring_key: Callable[[int], str]
) -> dict[str, int]:
    per_token: dict[int, list[int]] = {}
    for token, seq in stored:
        per_token.setdefault(token, []).append(seq)
    dups = not_tail = entries = short = 0
    async with aioredis.from_url(s.redis_url) as r:
        for token, seqs in per_token.items():
            seqs.sort()
            got: Any = await r.xrange(ring_key(token))
            ring = [msgspec.json.decode(f[b"d"])["sequence_id"] for _, f in got]
            entries += len(ring)
            dups += len(ring) - len(set(ring))
            uniq = sorted(set(ring))
            if not uniq or uniq != seqs[-len(uniq) :]:
                not_tail += 1
            short += max(0, min(len(seqs), s.ring_maxlen) - len(uniq))
    return {
        "ring_entries": entries,
        "ring_duplicates": dups,
        "ring_not_tail": not_tail,
        "ring_short": short,
    }


async def dlq_figures(s: Settings, stream: Stream) -> dict[str, int]:
    c = AIOKafkaConsumer(
        s.topic_dlq,
        bootstrap_servers=s.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await c.start()
    seen: list[Any] = []
    try:
        tps = [TopicPartition(s.topic_dlq, p) for p in c.partitions_for_topic(s.topic_dlq) or ()]
        ends = await c.end_offsets(tps)
        total = sum(ends.values())
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=500)).values():
                seen.extend(recs)
    finally:
        await c.stop()
    sources = set()
    values = set()
    for rec in seen:
        h = {k: v for k, v in rec.headers or ()}
        sources.add((h.get("topic"), h.get("partition"), h.get("offset")))
        values.add(rec.value)
    return {
        "dlq": len(seen),
        "dlq_unique": len(sources),
        "dlq_missing": len(stream.bad - values),
        "bad": len(stream.bad),
    }
