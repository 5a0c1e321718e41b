"""Sensors: the gap-repair launcher, in batches.

Each evaluation frees the claims of repair runs that died, then, while fewer than
``gap_repair_max_runs`` gap-repair runs are queued or running, claims open gaps in the
database (per trading day, up to ``gap_repair_batch_size`` a batch: :func:`nadi.repair.
claim_batches`) and asks for one run per batch, its run key the batch key. The claim is
what keeps two evaluations (or an evaluation and a run started by hand) from repairing a
gap twice at once; the run key keeps the daemon from launching a batch twice.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

from dataclasses import dataclass
from datetime import date

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunConfig,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from nadi.calendar import is_trading_day, today_ist
from nadi.repair import Batch, claim_batches, claims_held, release
from nadi.settings import Settings
from pipelines.assets.candles import CandleRefreshConfig
from pipelines.assets.repair import MANUAL_CLAIM_PREFIX, GapRepairConfig
from pipelines.jobs import IN_PROGRESS_RUN_STATUSES, gap_repair_job, gap_repair_off_calendar_job
from pipelines.partitions import PARTITIONS_START, partition_key
from pipelines.resources import TimescaleResource, run_async

BATCH_TAG = "nadi/gap_batch"  # the batch key, also the run key
DAY_TAG = "nadi/trading_day"
GAPS_TAG = "nadi/gaps"  # how many gaps the batch holds
GAP_REPAIR_JOBS = (gap_repair_job.name, gap_repair_off_calendar_job.name)
# Queued or under way: a batch's claim is kept while its run is in one of these.
ACTIVE_RUN_STATUSES = (
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    *IN_PROGRESS_RUN_STATUSES,
)


# The repair marked its windows dirty: the run's candle step refreshes just those.
_DIRTY_ONLY = CandleRefreshConfig.model_validate({"full": False})


@dataclass(frozen=True)
class GapSensorPolicy:
    """How the sensor batches (from the ``gap_repair_*`` settings)."""

    batch_size: int = 500
    max_runs: int = 2
    interval_s: int = 5
    grace_s: float = 10.0
    claim_timeout_s: float = 120.0
    retry_s: float = 30.0
    max_attempts: int = 3
    concurrency: int = 8

    @classmethod
    def from_settings(cls, s: Settings) -> "GapSensorPolicy":
        return cls(
            batch_size=s.gap_repair_batch_size, max_runs=s.gap_repair_max_runs,
            interval_s=s.gap_repair_sensor_interval_s, grace_s=s.gap_repair_grace_s,
            claim_timeout_s=s.gap_repair_claim_timeout_s, retry_s=s.gap_repair_retry_s,
            max_attempts=s.gap_repair_max_attempts, concurrency=s.gap_repair_concurrency,
        )  # fmt: skip


def _in_partitions(d: date, today: date) -> bool:
    return PARTITIONS_START <= d <= today and is_trading_day(d)


def batch_run_request(b: Batch, policy: GapSensorPolicy, today: date) -> RunRequest:
    """The run of one claimed batch: ``gap_repair_job`` on the day's partition (then that
    day's dirty candle windows), or the off-calendar job for days that are no partition."""
    repair = GapRepairConfig(gap_ids=b.gap_ids, claim=b.key, concurrency=policy.concurrency)
    tags = {BATCH_TAG: b.key, DAY_TAG: b.trading_day.isoformat(), GAPS_TAG: str(len(b.gaps))}
    if _in_partitions(b.trading_day, today):
        return RunRequest(
            run_key=b.key,
            job_name=gap_repair_job.name,
            partition_key=partition_key(b.trading_day),
            run_config=RunConfig(ops={"gap_repair": repair, "candles": _DIRTY_ONLY}),
            tags=tags,
        )
    return RunRequest(
        run_key=b.key,
        job_name=gap_repair_off_calendar_job.name,
        run_config=RunConfig(ops={"repair_gaps_off_calendar": repair}),
        tags=tags,
    )


def active_runs(instance: DagsterInstance) -> tuple[int, set[str]]:
    """Gap-repair runs queued or under way, and the claim keys they hold."""
    n = 0
    keys: set[str] = set()
    for job_name in GAP_REPAIR_JOBS:
        for run in instance.get_runs(
            RunsFilter(job_name=job_name, statuses=list(ACTIVE_RUN_STATUSES))
        ):
            n += 1
            keys.add(run.tags.get(BATCH_TAG) or f"{MANUAL_CLAIM_PREFIX}{run.run_id}")
    return n, keys


def dead_claims(
    instance: DagsterInstance, held: dict[str, float], active: set[str], timeout_s: float
) -> list[str]:
    """Claims whose run ended without releasing them (it crashed), or never appeared."""
    out: list[str] = []
    for key, age_s in held.items():
        if key in active:
            continue
        if key.startswith(MANUAL_CLAIM_PREFIX):
            # A run started by hand (any job, the UI's asset job too): dead once it ended.
            run = instance.get_run_by_id(key.removeprefix(MANUAL_CLAIM_PREFIX))
            if run is None or run.is_finished:
                out.append(key)
        elif age_s > timeout_s:
            # Not queued nor running: its run ended (a finished run releases its own claim,
            # so it crashed) or was never created after the sensor's tick.
            out.append(key)
    return out


async def _claim(
    db: TimescaleResource,
    instance: DagsterInstance,
    policy: GapSensorPolicy,
    n_active: int,
    active: set[str],
) -> tuple[list[Batch], list[int], int]:
    async with db.connect() as conn:
        dead = dead_claims(instance, await claims_held(conn), active, policy.claim_timeout_s)
        freed = await release(conn, dead) if dead else 0
        claims = await claim_batches(
            conn, grace_s=policy.grace_s, batch_size=policy.batch_size,
            max_batches=policy.max_runs - n_active, max_attempts=policy.max_attempts,
            retry_s=policy.retry_s,
        )  # fmt: skip
    return claims.batches, claims.gave_up, freed


def evaluate(
    context: SensorEvaluationContext,
    timescale: TimescaleResource,
    policy: GapSensorPolicy,
    today: date,
) -> list[RunRequest] | SkipReason:
    n_active, active = active_runs(context.instance)
    batches, gave_up, freed = run_async(
        _claim(timescale, context.instance, policy, n_active, active)
    )
    if freed:
        context.log.warning(f"released {freed} gaps claimed by repair runs that died")
    if gave_up:
        context.log.warning(f"gaps {gave_up} unrecoverable: attempts used up")
    if not batches:
        if n_active >= policy.max_runs:
            return SkipReason(f"{n_active} gap-repair runs queued or running (the limit)")
        return SkipReason("no open gap to claim")
    return [batch_run_request(b, policy, today) for b in batches]


def build_gap_repair_sensor(settings: Settings) -> SensorDefinition:
    """``gap_repair_sensor`` with the batching of ``settings``."""
    policy = GapSensorPolicy.from_settings(settings)

    @sensor(
        name="gap_repair_sensor",
        jobs=[gap_repair_job, gap_repair_off_calendar_job],
        minimum_interval_seconds=policy.interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Claims open rows of `sequence_gaps` in batches (one trading day, up to "
            f"{policy.batch_size} gaps each) and launches one `gap_repair_job` run per batch "
            f"(run key: the batch key), keeping at most {policy.max_runs} such runs queued or "
            "running; frees the claims of runs that died."
        ),
    )
    def gap_repair_sensor(
        context: SensorEvaluationContext, timescale: TimescaleResource
    ) -> list[RunRequest] | SkipReason:
        return evaluate(context, timescale, policy, today_ist())

    return gap_repair_sensor
