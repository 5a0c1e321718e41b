"""Prometheus gauges for what has no metrics endpoint of its own (issue 13).

Dagster exports nothing, and the database's view (gaps, instruments gone silent, the EOD
verdicts) is not any one process's. This exporter reads them every ``NADI_EXPORTER_INTERVAL_S``
and serves them on ``127.0.0.1:NADI_EXPORTER_PORT`` (``python -m pipelines.exporter``; `nadi up`
runs it under its supervisor):

* Dagster, through :class:`DagsterInstance` methods only (no GraphQL, no storage tables): runs
  by status, queued runs by ``nadi/kind``, failures today, each sensor's time since its last
  tick, the latest evaluation of the EOD asset check.
* The database, as ``nadi_maint`` (it may read ``ingest_state``): ``sequence_gaps`` (open,
  oldest open, today's by status), the last tick of each instrument that ticked today (from
  ``ingest_state.updated_at``), the latest day of ``eod_reconciliation`` by verdict.
* Kafka: the consumer group's lag (end offsets minus its committed offsets) and the topics'
  end offsets (their rates are the ticks and dead letters coming in).
* The calendar: ``nadi_market_open`` (NSE session, 09:15-15:30 IST on trading days), so an
  alert rule can ask "no ticks while the market is open" without knowing the holidays.

Each part has a deadline and its own error counter; one part failing leaves the others' gauges
fresh, and ``nadi_exporter_last_success_timestamp_seconds{part}`` says how old each is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dtime
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from nadi.calendar import is_trading_day, session_bounds
from nadi.kafka_admin import group_offsets
from nadi.logs import configure, get_logger
from nadi.settings import Settings, get_settings
from nadi.times import IST
from pipelines.launch import TAG_LIMITS

if TYPE_CHECKING:
    from dagster import DagsterInstance

log = get_logger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

# Run tag values that have their own concurrency limit (pipelines/launch.py TAG_LIMITS).
RUN_KINDS = tuple(kind for kind, _ in TAG_LIMITS)
EOD_ASSET = "eod_reconciliation"
EOD_CHECK = "matches_bhavcopy"  # pipelines/checks.py (read by name: no asset import needed)
# The reconciliation runs at 16:00 IST; past this hour a trading day without one is overdue.
EOD_DUE = dtime(17, 0)
PART_DEADLINE_S = 4.0

REGISTRY = CollectorRegistry()


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=REGISTRY)


MARKET_OPEN = _gauge("nadi_market_open", "1 during the NSE session (09:15-15:30 IST, trading days)")
TRADING_DAY = _gauge("nadi_trading_day", "1 when today (IST) is an NSE trading day")
RUNS = _gauge("nadi_dagster_runs", "Dagster runs by status (all kept runs)", ("status",))
QUEUED = _gauge("nadi_dagster_queued_runs", "Queued Dagster runs by nadi/kind tag", ("kind",))
FAILED_TODAY = _gauge("nadi_dagster_runs_failed_today", "Runs that failed since 00:00 IST")
SENSOR_AGE = _gauge(
    "nadi_dagster_sensor_last_tick_age_seconds",
    "Seconds since the sensor's last evaluation (the daemon runs sensors)",
    ("sensor",),
)
SENSOR_RUNNING = _gauge("nadi_dagster_sensor_running", "1 when the sensor is on", ("sensor",))
# Labelled so that nothing is exposed before the check has run once (0 would read "failed").
EOD_CHECK_PASSED = _gauge(
    "nadi_eod_check_passed",
    "Latest evaluation of the EOD asset check: 1 passed, 0 failed",
    ("check",),
)
EOD_CHECK_TS = _gauge("nadi_eod_check_timestamp_seconds", "When the EOD check last ran", ("check",))
GAPS_OPEN = _gauge("nadi_gaps_open", "Open rows of sequence_gaps (any day)")
GAPS_OLDEST = _gauge(
    "nadi_gaps_oldest_open_age_seconds", "Age of the oldest open gap (0 when none is open)"
)
GAPS_TODAY = _gauge("nadi_gaps_today", "Gaps of today's trading day (IST) by status", ("status",))
GAPS_REPAIRED_TODAY = _gauge(
    "nadi_gaps_repaired_today", "Gaps closed since 00:00 IST (late ticks or repairs, any day)"
)
LAST_TICK_AGE = _gauge(
    "nadi_instrument_last_tick_age_seconds",
    "Seconds since the last stored tick of an instrument that ticked today",
    ("instrument_token", "tradingsymbol"),
)
EOD_INSTRUMENTS = _gauge(
    "nadi_eod_reconciliation_instruments",
    "Instruments of the latest reconciled day by verdict",
    ("verdict",),
)
EOD_DAY = _gauge(
    "nadi_eod_reconciliation_day_timestamp_seconds", "00:00 IST of the latest reconciled day"
)
EOD_OVERDUE = _gauge(
    "nadi_eod_reconciliation_overdue", "1 on a trading day after 17:00 IST with no reconciliation"
)
GROUP_LAG = _gauge(
    "nadi_kafka_consumer_group_lag", "Messages not yet committed by the processor group", ("topic",)
)
TOPIC_END = _gauge(
    "nadi_kafka_topic_end_offset",
    "Sum of the topic's end offsets (messages ever written)",
    ("topic",),
)
ERRORS = Counter(
    "nadi_exporter_errors", "Collection failures by part", ("part",), registry=REGISTRY
)
LAST_OK = _gauge(
    "nadi_exporter_last_success_timestamp_seconds", "Last successful collection by part", ("part",)
)


# ---- pure parts ---------------------------------------------------------------------------


def market_open(now: datetime) -> bool:
    """Whether ``now`` (aware) falls in the NSE normal session of a trading day."""
    day = now.astimezone(IST).date()
    if not is_trading_day(day):
        return False
    start, end = session_bounds(day)
    return start <= now < end


def eod_overdue(now: datetime, latest_day: date | None) -> bool:
    """A trading day past :data:`EOD_DUE` whose reconciliation is not in the table."""
    local = now.astimezone(IST)
    today = local.date()
    return is_trading_day(today) and local.time() >= EOD_DUE and latest_day != today


def ist_midnight(now: datetime) -> datetime:
    """00:00 IST of ``now``'s IST day, as an aware UTC datetime.

    UTC because Dagster's run filters drop the tzinfo and compare with a naive UTC column: an
    IST-aware bound would land 5 h 30 late (after 18:30 UTC today's failures vanished).
    """
    return datetime.combine(now.astimezone(IST).date(), dtime(0), IST).astimezone(UTC)


# ---- collectors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DbFigures:
    gaps_open: int
    oldest_open_age_s: float
    gaps_today: Mapping[str, int]
    repaired_today: int
    last_tick_age_s: Mapping[tuple[int, str], float]
    eod_day: date | None
    eod_verdicts: Mapping[str, int]


async def collect_db(conn: asyncpg.Connection, now: datetime) -> DbFigures:
    """The database's figures as of ``now`` (passed in: tests pin the clock)."""
    today = now.astimezone(IST).date()
    midnight = ist_midnight(now)
    row = await conn.fetchrow(
        """SELECT count(*) AS n, min(detected_at) AS oldest FROM sequence_gaps
           WHERE status = 'open'"""
    )
    assert row is not None
    oldest = row["oldest"]
    by_status = await conn.fetch(
        "SELECT status, count(*) AS n FROM sequence_gaps WHERE trading_day = $1 GROUP BY 1", today
    )
    repaired = await conn.fetchval(
        "SELECT count(*) FROM sequence_gaps WHERE status = 'repaired' AND repaired_at >= $1",
        midnight,
    )
    ticked = await conn.fetch(
        """SELECT s.instrument_token, coalesce(i.tradingsymbol, '') AS sym, s.updated_at
           FROM ingest_state s LEFT JOIN instruments i USING (instrument_token)
           WHERE s.trading_day = $1""",
        today,
    )
    eod_day = await conn.fetchval("SELECT max(trading_day) FROM eod_reconciliation")
    verdicts = (
        await conn.fetch(
            "SELECT verdict, count(*) AS n FROM eod_reconciliation WHERE trading_day = $1 "
            "GROUP BY 1",
            eod_day,
        )
        if eod_day is not None
        else []
    )
    return DbFigures(
        gaps_open=int(row["n"]),
        oldest_open_age_s=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        gaps_today={s: 0 for s in ("open", "repaired", "unrecoverable")}
        | {r["status"]: int(r["n"]) for r in by_status},
        repaired_today=int(repaired),
        last_tick_age_s={
            (int(r["instrument_token"]), r["sym"]): max(
                0.0, (now - r["updated_at"]).total_seconds()
            )
            for r in ticked
        },
        eod_day=eod_day,
        eod_verdicts={r["verdict"]: int(r["n"]) for r in verdicts},
    )


@dataclass(frozen=True)
class DagsterFigures:
    runs: Mapping[str, int]
    queued_by_kind: Mapping[str, int]
    failed_today: int
    sensor_age_s: Mapping[str, float | None]  # None: never ticked
    sensor_running: Mapping[str, bool]
    eod_check: tuple[bool, float] | None = None  # (passed, timestamp)


def collect_dagster(instance: DagsterInstance, now: datetime) -> DagsterFigures:
    """Blocking (Dagster's storage is synchronous): run it in a thread."""
    from dagster import AssetCheckKey, AssetKey, DagsterRunStatus, RunsFilter

    runs = {s.value: instance.get_runs_count(RunsFilter(statuses=[s])) for s in DagsterRunStatus}
    queued = {
        k: instance.get_runs_count(
            RunsFilter(statuses=[DagsterRunStatus.QUEUED], tags={"nadi/kind": k})
        )
        for k in RUN_KINDS
    }
    failed_today = instance.get_runs_count(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE], updated_after=ist_midnight(now))
    )
    ages: dict[str, float | None] = {}
    running: dict[str, bool] = {}
    for state in instance.all_instigator_state():
        if state.instigator_type.value != "SENSOR":
            continue
        name = state.instigator_name
        running[name] = state.is_running
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
        ages[name] = max(0.0, now.timestamp() - ticks[0].timestamp) if ticks else None
    check = None
    key = AssetCheckKey(AssetKey(EOD_ASSET), EOD_CHECK)
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    if latest is not None and latest.status.value in ("SUCCEEDED", "FAILED"):
        check = (latest.status.value == "SUCCEEDED", float(latest.create_timestamp))
    return DagsterFigures(runs, queued, failed_today, ages, running, check)


@dataclass(frozen=True)
class KafkaFigures:
    lag: Mapping[str, int]
    end: Mapping[str, int]


def lag_of(ends: Mapping[int, int], committed: Mapping[int, int]) -> int:
    """Messages behind, over partitions; a partition with no commit counts from offset 0."""
    return sum(max(0, end - max(0, committed.get(p, -1))) for p, end in ends.items())


def collect_kafka(s: Settings) -> KafkaFigures:
    """Blocking (librdkafka): run it in a thread."""
    ends, done = group_offsets(s.kafka_bootstrap, s.group_id, s.topic_ticks)
    dlq_ends, _ = group_offsets(s.kafka_bootstrap, s.group_id, s.topic_dlq)
    return KafkaFigures(
        lag={s.topic_ticks: lag_of(ends, done)},
        end={s.topic_ticks: sum(ends.values()), s.topic_dlq: sum(dlq_ends.values())},
    )


# ---- gauges -------------------------------------------------------------------------------


def apply_db(f: DbFigures, now: datetime) -> None:
    GAPS_OPEN.set(f.gaps_open)
    GAPS_OLDEST.set(f.oldest_open_age_s)
    for status, n in f.gaps_today.items():
        GAPS_TODAY.labels(status=status).set(n)
    GAPS_REPAIRED_TODAY.set(f.repaired_today)
    LAST_TICK_AGE.clear()  # yesterday's instruments go with the day
    for (token, sym), age in f.last_tick_age_s.items():
        LAST_TICK_AGE.labels(instrument_token=str(token), tradingsymbol=sym).set(age)
    EOD_INSTRUMENTS.clear()
    for verdict, n in f.eod_verdicts.items():
        EOD_INSTRUMENTS.labels(verdict=verdict).set(n)
    if f.eod_day is not None:
        EOD_DAY.set(datetime.combine(f.eod_day, dtime(0), IST).timestamp())
    EOD_OVERDUE.set(eod_overdue(now, f.eod_day))


def apply_dagster(f: DagsterFigures) -> None:
    for status, n in f.runs.items():
        RUNS.labels(status=status).set(n)
    for kind, n in f.queued_by_kind.items():
        QUEUED.labels(kind=kind).set(n)
    FAILED_TODAY.set(f.failed_today)
    SENSOR_AGE.clear()
    for name, age in f.sensor_age_s.items():
        if age is not None:
            SENSOR_AGE.labels(sensor=name).set(age)
    for name, on in f.sensor_running.items():
        SENSOR_RUNNING.labels(sensor=name).set(on)
    if f.eod_check is not None:
        EOD_CHECK_PASSED.labels(check=EOD_CHECK).set(f.eod_check[0])
        EOD_CHECK_TS.labels(check=EOD_CHECK).set(f.eod_check[1])


def apply_kafka(f: KafkaFigures) -> None:
    for topic, n in f.lag.items():
        GROUP_LAG.labels(topic=topic).set(n)
    for topic, n in f.end.items():
        TOPIC_END.labels(topic=topic).set(n)


# ---- the loop -----------------------------------------------------------------------------


async def in_daemon_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn`` in a daemon thread of its own. Unlike ``asyncio.to_thread`` (whose executor is
    joined at exit) a call stuck past its deadline (librdkafka, a database that stopped
    answering) never keeps the process from exiting on SIGTERM."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)  # type: ignore[arg-type]
            else:
                assert isinstance(value, BaseException)
                fut.set_exception(value)

    def work() -> None:
        try:
            result: object = fn(*args, **kwargs)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=work, name=f"exporter-{fn.__name__}", daemon=True).start()
    return await fut


@dataclass
class Exporter:
    settings: Settings
    instance: DagsterInstance | None = None
    _busy: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def _part(self, part: str, work: asyncio.Future[None] | asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(work), PART_DEADLINE_S)
        except Exception as e:  # a part's failure is counted and logged; the others go on
            ERRORS.labels(part=part).inc()
            log.warning("exporter_part_failed", part=part, error=f"{type(e).__name__}: {e}")
            return
        LAST_OK.labels(part=part).set(time.time())

    async def _db(self) -> None:
        now = datetime.now(IST)
        conn = await asyncpg.connect(self.settings.maint_dsn, timeout=PART_DEADLINE_S)
        try:
            apply_db(await collect_db(conn, now), now)
        finally:
            await conn.close()

    async def _dagster(self) -> None:
        assert self.instance is not None
        apply_dagster(await in_daemon_thread(collect_dagster, self.instance, datetime.now(IST)))

    async def _kafka(self) -> None:
        apply_kafka(await in_daemon_thread(collect_kafka, self.settings))

    async def collect_once(self) -> None:
        now = datetime.now(IST)
        MARKET_OPEN.set(market_open(now))
        TRADING_DAY.set(is_trading_day(now.date()))
        parts = {"db": self._db, "kafka": self._kafka}
        if self.instance is not None:
            parts["dagster"] = self._dagster
        runs = []
        for part, fn in parts.items():
            # A part that overran its deadline keeps running (threads cannot be cancelled):
            # it is not started again until it has ended.
            if part in self._busy and not self._busy[part].done():
                ERRORS.labels(part=part).inc()
                continue
            self._busy[part] = asyncio.create_task(fn())
            runs.append(self._part(part, self._busy[part]))
        await asyncio.gather(*runs)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            # SIGTERM does not wait for a collection in progress: its gauges are not needed.
            collecting = asyncio.create_task(self.collect_once())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({collecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                collecting.cancel()
                break
            left = self.settings.exporter_interval_s - (time.monotonic() - t0)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, left))
            except TimeoutError:
                pass


def main() -> None:
    import signal

    configure()
    # Dagster's storage narrates its alembic migrations at INFO on every start.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = get_settings()
    instance = None
    try:
        from dagster import DagsterInstance

        instance = DagsterInstance.from_config(str(settings.dagster_home.resolve()))
    except ImportError:  # orchestration is optional: the database and Kafka parts still run
        log.warning("exporter_without_dagster")
    start_http_server(settings.exporter_port, addr="127.0.0.1", registry=REGISTRY)
    log.info("exporter_listening", port=settings.exporter_port)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Exporter(settings, instance).run(stop)

    asyncio.run(go())
    busy = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    log.info("exporter_stopped", threads=busy)
    # The work is done: a part stuck in its thread (it may hold the instance's connections) or
    # a storage thread of Dagster's must not keep the process from exiting on SIGTERM.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
