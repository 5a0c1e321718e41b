"""Jobs: what schedules, sensors and the launchpad run."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from datetime import date

from dagster import (
    AssetSelection,
    JobDefinition,
    OpExecutionContext,
    define_asset_job,
    in_process_executor,
    job,
    op,
)
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from nadi.redis_keys import RedisKeys
from nadi.ring import RingWriter
from pipelines.assets.candles import refresh_day
from pipelines.assets.quality import GapRepairConfig, gap_repair_metadata, repair_gaps
from pipelines.resources import (
    RecoverySourceResource,
    RedisResource,
    TimescaleResource,
    run_async,
)

CANDLES = AssetSelection.assets("candles_1m", "candles_5m")

storage_job = define_asset_job(
    "storage_job",
    selection=AssetSelection.assets("ticks_hypertable"),
    description="Migrations and the ticks hypertable's policies and maintenance.",
)
candles_job = define_asset_job(
    "candles_job",
    # Small runs: steps in the run's own process, not one subprocess each (~1 s apiece).
    executor_def=in_process_executor,
    selection=CANDLES,
    description="Refresh one trading day's candles (with the raw-tick check).",
)
gap_repair_job = define_asset_job(
    "gap_repair_job",
    # Small runs: steps in the run's own process, not one subprocess each (~1 s apiece).
    executor_def=in_process_executor,
    selection=AssetSelection.assets("gap_repair") | CANDLES,
    tags={"nadi/kind": "gap_repair"},
    description="Repair gaps of one trading day, then refresh that day's candles.",
)
eod_reconciliation_job = define_asset_job(
    "eod_reconciliation_job",
    # Small runs: steps in the run's own process, not one subprocess each (~1 s apiece).
    executor_def=in_process_executor,
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
    """Repair gaps by id whatever their day, then refresh the touched days' candles.

    Gaps on days outside the trading-day partitions (a live feed running on a weekend or a
    holiday: ingest has no trading-hours check) have no partition to run in.
    """
    t0 = time.perf_counter()

    async def go() -> list[date]:
        async with redis.client() as client, timescale.connect() as conn:
            ring = RingWriter(
                client, await RedisKeys.load(conn), maxlen=redis.ring_maxlen, ttl_s=redis.ttl_s
            )
            outcomes = await repair_gaps(timescale, recovery, None, config.gap_ids, ring)
        days = sorted(await _days_of(timescale, [o.gap_id for o in outcomes]))
        async with timescale.connect() as conn:
            for d in days:
                await refresh_day(conn, d, full=False)
        md = gap_repair_metadata(outcomes, round((time.perf_counter() - t0) * 1000, 1))
        context.log.info(str(md["gaps"].value))  # an op job has no asset to carry metadata
        return days

    days = run_async(go())
    context.log.info(f"candles refreshed for {days}")


async def _days_of(db: TimescaleResource, ids: list[int]) -> list[date]:
    async with db.connect() as conn:
        return [
            r[0]
            for r in await conn.fetch(
                "SELECT DISTINCT trading_day FROM sequence_gaps WHERE id = ANY($1::bigint[])", ids
            )
        ]


@job(
    tags={"nadi/kind": "gap_repair"},
    description="Repair gaps on days that are not trading-day partitions (weekends, holidays).",
)
def gap_repair_off_calendar_job() -> None:
    repair_gaps_off_calendar()


all_jobs: list[JobDefinition | UnresolvedAssetJobDefinition] = [
    storage_job,
    candles_job,
    gap_repair_job,
    eod_reconciliation_job,
    replay_job,
    gap_repair_off_calendar_job,
]
