"""Jobs: what schedules, sensors and the launchpad run."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from datetime import date
from functools import partial

from dagster import (
    AssetSelection,
    DagsterRunStatus,
    OpExecutionContext,
    define_asset_job,
    in_process_executor,
    job,
    op,
)

from nadi.calendar import today_ist
from pipelines.assets.candles import refresh_day
from pipelines.assets.repair import GapRepairConfig, gap_repair_metadata, run_repair
from pipelines.resources import (
    RecoverySourceResource,
    RedisResource,
    TimescaleResource,
    run_async,
)

CANDLES = AssetSelection.assets("candles_1m", "candles_5m")

STORAGE_POLICIES = AssetSelection.assets(
    "ticks_hypertable", "ticks_retention", "ticks_compression", "candle_refresh_policy"
)
# Jobs of small runs: steps in the run's own process, not one subprocess each (~1 s apiece).
_small_job = partial(define_asset_job, executor_def=in_process_executor)


storage_job = define_asset_job(
    "storage_job",
    selection=STORAGE_POLICIES,
    description=(
        "Migrations, the ticks hypertable's settings and the storage policies Dagster runs on "
        "both editions: retention, compression (Timescale license), candle refresh."
    ),
)
candle_refresh_job = _small_job(
    "candle_refresh_job",
    selection=AssetSelection.assets("candle_refresh_policy"),
    description="Refresh the candles of every marked window of any day (late ticks, backfills).",
)
candles_job = _small_job(
    "candles_job",
    selection=CANDLES,
    description="Refresh one trading day's candles (with the raw-tick check).",
)
gap_repair_job = _small_job(
    "gap_repair_job",
    selection=AssetSelection.assets("gap_repair") | CANDLES,
    tags={"nadi/kind": "gap_repair"},
    description="Repair gaps of one trading day, then refresh that day's candles.",
)
eod_reconciliation_job = _small_job(
    "eod_reconciliation_job",
    selection=AssetSelection.assets("eod_reconciliation"),
    description="Reconcile one trading day with the exchange's bhavcopy.",
)
replay_job = define_asset_job(
    "replay_job",
    selection=AssetSelection.assets("ticks_replay"),
    tags={"nadi/kind": "replay"},
    description="Replay a range of stored ticks into Kafka (instruments, range, speed, topic).",
)


@op(tags={"nadi/kind": "gap_repair"})
def repair_gaps_off_calendar(
    context: OpExecutionContext,
    config: GapRepairConfig,
    timescale: TimescaleResource,
    recovery: RecoverySourceResource,
    redis: RedisResource,
) -> None:
    """Repair a batch of gaps whatever their day, then refresh the touched days' candles.

    Gaps on days outside the trading-day partitions (a live feed running on a weekend or a
    holiday: ingest has no trading-hours check) have no partition to run in.
    """
    t0 = time.perf_counter()

    async def go() -> list[date]:
        outcomes = await run_repair(
            timescale, recovery, redis, config, run_id=context.run_id, day=None,
            today=today_ist(),
        )  # fmt: skip
        days = sorted({o.trading_day for o in outcomes if o.inserted})
        async with timescale.connect() as conn:
            for d in days:
                await refresh_day(conn, d, full=False)
        md = gap_repair_metadata(outcomes, round((time.perf_counter() - t0) * 1000, 1))
        context.log.info(str(md["gaps"].value))  # an op job has no asset to carry metadata
        return days

    days = run_async(go())
    context.log.info(f"candles refreshed for {days}")


@job(
    tags={"nadi/kind": "gap_repair"},
    description="Repair gaps on days that are not trading-day partitions (weekends, holidays).",
)
def gap_repair_off_calendar_job() -> None:
    repair_gaps_off_calendar()


# A run in one of these states is under way: schedules and sensors do not start another of its
# job. The same set as Dagster's internal IN_PROGRESS_RUN_STATUSES, named with the public enum.
IN_PROGRESS_RUN_STATUSES = (
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
    DagsterRunStatus.SUSPENDED,
)

# A tuple, not an annotated list: each element keeps its own Dagster type without naming the
# private UnresolvedAssetJobDefinition, and Definitions(jobs=...) takes any iterable.
all_jobs = (
    storage_job,
    candle_refresh_job,
    candles_job,
    gap_repair_job,
    eod_reconciliation_job,
    replay_job,
    gap_repair_off_calendar_job,
)
