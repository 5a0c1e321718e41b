"""Sensors: the gap-repair launcher."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

from collections.abc import Sequence
from datetime import date

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from nadi.calendar import is_trading_day, today_ist
from pipelines.jobs import IN_PROGRESS_RUN_STATUSES, gap_repair_job, gap_repair_off_calendar_job
from pipelines.partitions import PARTITIONS_START, partition_key
from pipelines.resources import TimescaleResource, run_async

GAP_TAG = "nadi/gap_id"
# A gap younger than this is left to late arrivals (feed B, reordering) before the recovery
# service is asked; the processor closes most such gaps within milliseconds.
GRACE_S = 10
MAX_RUNS_PER_TICK = 200


async def open_gaps(db: TimescaleResource, grace_s: float) -> list[tuple[int, date, int, int]]:
    """(id, trading_day, instrument_token, repair_attempts) of open gaps past the grace."""
    async with db.connect() as conn:
        rows = await conn.fetch(
            """SELECT id, trading_day, instrument_token, repair_attempts FROM sequence_gaps
               WHERE status = 'open' AND detected_at <= now() - make_interval(secs => $1)
               ORDER BY detected_at, id LIMIT $2""",
            grace_s,
            MAX_RUNS_PER_TICK,
        )
    return [(int(r[0]), r[1], int(r[2]), int(r[3])) for r in rows]


def _in_partitions(d: date) -> bool:
    return PARTITIONS_START <= d <= today_ist() and is_trading_day(d)


def gap_run_requests(
    gaps: Sequence[tuple[int, date, int, int]], busy: set[int]
) -> list[RunRequest]:
    """One run per gap not already being repaired. The run key (gap id + attempt number) makes
    the daemon launch each attempt once; a run bumps repair_attempts when it starts, and the
    gap is skipped (``busy``) while that run is queued or running, so the next attempt is only
    requested after the previous run has ended."""
    out: list[RunRequest] = []
    for gap_id, day, token, attempts in gaps:
        if gap_id in busy:
            continue
        tags = {GAP_TAG: str(gap_id), "nadi/instrument_token": str(token)}
        key = f"gap-{gap_id}-attempt-{attempts + 1}"
        if _in_partitions(day):
            out.append(
                RunRequest(
                    run_key=key,
                    job_name=gap_repair_job.name,
                    partition_key=partition_key(day),
                    run_config={
                        "ops": {
                            "gap_repair": {"config": {"gap_ids": [gap_id]}},
                            # the repair marked its windows dirty: refresh just those
                            "candles": {"config": {"full": False}},
                        }
                    },
                    tags=tags,
                )
            )
        else:
            out.append(
                RunRequest(
                    run_key=key,
                    job_name=gap_repair_off_calendar_job.name,
                    run_config={
                        "ops": {"repair_gaps_off_calendar": {"config": {"gap_ids": [gap_id]}}}
                    },
                    tags=tags,
                )
            )
    return out


@sensor(
    jobs=[gap_repair_job, gap_repair_off_calendar_job],
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Reads open rows of `sequence_gaps` and launches one `gap_repair_job` run per gap (run "
        "key: gap id + attempt), skipping gaps a queued or running repair already holds."
    ),
)
def gap_repair_sensor(
    context: SensorEvaluationContext, timescale: TimescaleResource
) -> list[RunRequest] | SkipReason:
    gaps = run_async(open_gaps(timescale, GRACE_S))
    if not gaps:
        return SkipReason("no open gaps")
    busy: set[int] = set()
    for job_name in (gap_repair_job.name, gap_repair_off_calendar_job.name):
        for run in context.instance.get_runs(
            RunsFilter(job_name=job_name, statuses=list(IN_PROGRESS_RUN_STATUSES))
        ):
            if GAP_TAG in run.tags:
                busy.add(int(run.tags[GAP_TAG]))
    requests = gap_run_requests(gaps, busy)
    if not requests:
        return SkipReason(f"{len(gaps)} open gaps, all being repaired")
    return requests
