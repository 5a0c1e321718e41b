"""The rows of the fault matrix (issue 8, Deliver 3): what each does to the running group.

Every fault starts while the stream flows (at a share of it acknowledged by Kafka), ends with
``run.end_fault()`` (``recovery_s`` counts from there) and synchronises on conditions with
deadlines; the only sleeps are the durations of faults themselves (a service down 30 s).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time
from typing import Any

import psutil
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka import TopicPartition as CTopicPartition
from confluent_kafka.admin import AdminClient

from bench.faults.engine import Fault, Row, Run, group_members, wait_until
from bench.faults.ws_row import api_row
from nadi.kafka_admin import group_offsets
from nadi.settings import Settings

# NADI_FAULT=<point>:<n>: the worker SIGKILLs itself the n-th time it reaches <point>.
CRASH_POINTS: dict[str, int] = {
    "after_decode": 12,
    "after_db_commit": 8,
    "after_ring_write": 8,
    "mid_group_commit": 3,  # group commits of >= 2 batches (the row slows the database)
    # The initial join calls on_partitions_revoked(empty) and on_partitions_assigned; the
    # 3rd callback is the revocation when a second member joins, with batches in flight.
    "in_rebalance": 3,
    "after_dlq_produce": 3,
}


def reset_offsets(s: Settings, offsets: dict[int, int]) -> None:
    """Set the (empty) group's committed offsets (blocking)."""
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    req = ConsumerGroupTopicPartitions(
        s.group_id, [CTopicPartition(s.topic_ticks, p, o) for p, o in sorted(offsets.items())]
    )
    admin.alter_consumer_group_offsets([req])[s.group_id].result(timeout=30)


async def _group_empty(s: Settings) -> bool:
    try:
        return not await asyncio.to_thread(group_members, s)
    except Exception:
        return False


# -- SIGKILL at a crash point ------------------------------------------------------------------
# Latency on the database's link for the mid_group_commit row: batches queue up behind each
# transaction, so group commits with several members happen for certain (with a fast database
# they depend on the machine's timing and a point at n may never be reached).
SLOW_DB_MS = 40


def crash_row(point: str) -> Row:
    rebalance = point == "in_rebalance"
    slow_db = point == "mid_group_commit"

    async def fault(run: Run) -> None:
        first = run.workers.procs[0]
        if slow_db:
            assert run.stack.toxics is not None
            run.stack.toxics.add_toxic("pg", "latency", {"latency": SLOW_DB_MS})
        if rebalance:  # a member joining makes the group rebalance under the first one
            await run.producer.reached(0.3)

            async def owns_all() -> bool:  # the first's initial join is over (2 callbacks)
                try:
                    return await asyncio.to_thread(group_members, run.s) == [set(range(6))]
                except Exception:
                    return False

            await wait_until(owns_all, 60, "the first worker to own every partition")
            run.workers.spawn()
        budget = 120 + run.n / 500
        await wait_until(lambda: first.poll() is not None, budget, f"NADI_FAULT {point} to fire")
        if slow_db:
            assert run.stack.toxics is not None
            run.stack.toxics.reset()
        run.end_fault()
        run.notes["killed_at"] = round(run.producer.acked / run.stream.sent, 2)
        if first.returncode != -signal.SIGKILL:
            run.problems.append(f"the worker at {point} ended with {first.returncode}, not SIGKILL")
        run.workers.reap()
        run.workers.spawn()  # its replacement, without the fault

    return Row(
        name=f"sigkill_{point}",
        fault=fault,
        workers=1 if rebalance else 2,
        first_fault=f"{point}:{CRASH_POINTS[point]}",
        proxied=slow_db,
        check=_dlq_again if point == "after_dlq_produce" else None,
    )


def _dlq_again(run: Run, figures: dict[str, Any]) -> None:
    """Killed after producing dead letters and before committing their offsets: the batch is
    redelivered and dead-lettered again (at least once, dedup by the source headers)."""
    if figures["dlq"] <= figures["bad"]:
        run.problems.append(
            f"dlq = {figures['dlq']} after a kill at after_dlq_produce: nothing dead-lettered twice"
        )


# -- the group ---------------------------------------------------------------------------------
async def _sigstop(run: Run) -> None:
    await run.producer.reached(0.15)
    victim, other = run.workers.procs[0], run.workers.procs[1]
    victim.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()

    async def moved() -> bool:
        try:
            members = await asyncio.to_thread(group_members, run.s)
        except Exception:
            return False
        return len(members) == 1 and members[0] == set(range(6))

    # Beyond the session timeout (10 s) the group gives the zombie's partitions to the other.
    await wait_until(moved, 90, "the group to move the stopped worker's partitions")
    run.notes["moved_after_s"] = round(time.monotonic() - t0, 1)
    await run.producer.reached(0.7)  # the new owner writes and commits on them
    # The zombie wakes with batches prepared against state that has moved on, while the
    # stream still flows (else there is nothing left for it to corrupt).
    if run.producer.done.is_set():
        run.problems.append("the stream was over before the zombie woke: the row tested less")
    victim.send_signal(signal.SIGCONT)
    run.notes["stopped_s"] = round(time.monotonic() - t0, 1)
    run.notes["woke_at"] = round(run.producer.acked / run.stream.sent, 2)
    assert other.poll() is None, "the other worker died"
    run.end_fault()


async def _storm(run: Run) -> None:
    rng = random.Random(5)
    events: list[str] = []
    interval = 2.5
    while not run.producer.done.is_set():
        # The cadence of the storm (a fault's timing, not synchronisation).
        await asyncio.sleep(interval)
        run.workers.reap()
        alive = run.workers.alive()
        if len(alive) <= 1 or (len(alive) < 4 and rng.random() < 0.5):
            run.workers.spawn()
            events.append("add")
        else:
            run.workers.kill(rng.choice(alive))
            events.append("kill")
    run.workers.reap()
    while len(run.workers.alive()) < 2:
        run.workers.spawn()
    run.notes["storm"] = ",".join(events)
    run.end_fault()


# -- services ----------------------------------------------------------------------------------
async def _kafka_kill(run: Run) -> None:
    await run.producer.reached(0.4)
    run.stack.kill_kafka()
    t0 = time.monotonic()
    await asyncio.to_thread(run.stack.start_kafka)
    run.notes["broker_down_s"] = round(time.monotonic() - t0, 1)
    run.end_fault()


def _down(service: str, seconds: float) -> Fault:
    async def fault(run: Run) -> None:
        await run.producer.reached(0.3)
        srv = run.stack.pg if service == "pg" else run.stack.redis
        await asyncio.to_thread(srv.stop)
        await asyncio.sleep(seconds)  # the outage itself
        await asyncio.to_thread(srv.start)
        run.end_fault()

    return fault


async def _redis_flush(run: Run) -> None:
    await run.producer.reached(0.5)
    await run.stack.flush_redis()
    run.end_fault()


async def _redis_old_snapshot(run: Run) -> None:
    import redis.asyncio as aioredis

    await run.producer.reached(0.25)
    r = aioredis.from_url(run.s.redis_url)
    try:
        await r.save()
    finally:
        await r.aclose()
    snapshot = run.dir / "older.rdb"
    shutil.copyfile(run.stack.rdb, snapshot)
    await run.producer.reached(0.6)
    run.stack.kill_redis()  # SIGKILL: no snapshot at exit
    shutil.copyfile(snapshot, run.stack.rdb)
    await asyncio.to_thread(run.stack.redis.start)
    run.end_fault()


async def _stop_workers(run: Run) -> int:
    n = len(run.workers.alive())
    codes = run.workers.stop_all()
    if any(c != 0 for c in codes):
        run.problems.append(f"workers did not stop cleanly before the swap: {codes}")
    await wait_until(lambda: _group_empty(run.s), 60, "the group to be empty")
    return n


async def _fresh_database(run: Run) -> None:
    await run.producer.reached(0.4)
    n = await _stop_workers(run)
    await run.stack.fresh_database(migrate=True)  # new, empty; Redis keeps the old state
    await asyncio.to_thread(reset_offsets, run.s, dict.fromkeys(range(6), 0))
    for _ in range(n):
        run.workers.spawn()
    run.end_fault()


async def _restored_dump(run: Run) -> None:
    await run.producer.reached(0.3)
    before: dict[int, int] = {}

    async def committed() -> bool:  # the dump must come after some of the stream is stored
        nonlocal before
        _, before = await asyncio.to_thread(
            group_offsets, run.s.kafka_bootstrap, run.s.group_id, run.s.topic_ticks
        )
        return sum(max(0, o) for o in before.values()) > 0

    await wait_until(committed, 60, "the group to commit before the dump")
    dump = run.stack.paths.pg / "row.dump"
    dump.unlink(missing_ok=True)
    await asyncio.to_thread(run.stack.pg_dump, dump)
    run.notes["offsets_before_dump"] = sum(max(0, o) for o in before.values())
    await run.producer.reached(0.7)
    n = await _stop_workers(run)
    await run.stack.pg_restore(dump)
    await asyncio.to_thread(reset_offsets, run.s, {p: max(0, o) for p, o in before.items()})
    for _ in range(n):
        run.workers.spawn()
    run.end_fault()


def _restored_check(run: Run, figures: dict[str, Any]) -> None:
    if not run.notes.get("offsets_before_dump"):
        run.problems.append("nothing was committed before the dump: the row tested nothing")


# -- the network, through Toxiproxy ------------------------------------------------------------
TOXICS: dict[str, tuple[str, dict[str, int | float], float]] = {
    # name: (toxic type, attributes, seconds it stays)
    "latency": ("latency", {"latency": 200, "jitter": 50}, 6.0),
    "reset": ("reset_peer", {"timeout": 0}, 4.0),
    "hang": ("timeout", {"timeout": 0}, 12.0),
}


def _assert_proxied(run: Run, service: str) -> None:
    """The workers reach ``service`` only through its proxy, else the toxic would miss them
    (a Kafka client that followed a direct advertised address, say)."""
    p = run.stack.ports
    direct = {"pg": p.pg, "redis": p.redis, "kafka": p.kafka}[service]
    via = {"pg": p.proxy_pg, "redis": p.proxy_redis, "kafka": p.proxy_kafka}[service]
    through = bypass = 0
    for w in run.workers.alive():
        for c in psutil.Process(w.pid).net_connections("tcp"):
            if c.raddr and c.status == psutil.CONN_ESTABLISHED:
                through += c.raddr.port == via
                bypass += c.raddr.port == direct
    run.notes["proxied_connections"] = through
    assert through > 0 and bypass == 0, (
        f"workers' connections to {service}: {through} through the proxy, {bypass} direct"
    )


def network_row(service: str, kind: str) -> Row:
    toxic, attributes, seconds = TOXICS[kind]

    async def fault(run: Run) -> None:
        assert run.stack.toxics is not None
        await run.producer.reached(0.3)
        _assert_proxied(run, service)
        for stream in ("downstream", "upstream"):
            run.stack.toxics.add_toxic(service, toxic, attributes, stream=stream)
        await asyncio.sleep(seconds)  # how long the link misbehaves
        run.stack.toxics.reset()
        run.end_fault()

    return Row(name=f"net_{service}_{kind}", fault=fault, proxied=True)


ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        *(crash_row(p) for p in CRASH_POINTS),
        # Long enough that the stream outlasts the session timeout (10 s) and the move.
        Row("sigstop_zombie", _sigstop, workers=2, stream_s=30.0),
        Row("rebalance_storm", _storm, workers=3, stream_s=14.0),
        Row("kafka_broker_sigkill", _kafka_kill),
        Row("postgres_down_30s", _down("pg", 30.0)),
        Row("redis_down_30s", _down("redis", 30.0)),
        Row("redis_flushed", _redis_flush, redis_kept=False),
        Row("redis_older_snapshot", _redis_old_snapshot, redis_kept=False),
        Row("database_replaced", _fresh_database, redis_kept=False),
        Row("database_restored_from_dump", _restored_dump, check=_restored_check),
        *(network_row(svc, k) for svc in ("pg", "redis", "kafka") for k in TOXICS),
        api_row(),
    ]
}
