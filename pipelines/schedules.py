"""Schedules, all in Asia/Kolkata: intraday candles, the candle refresh policy, EOD
reconciliation, nightly replay, daily storage upkeep and policies. Exchange holidays are skipped in the evaluation (cron cannot know them)."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

from datetime import datetime, timedelta
from functools import partial

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from nadi.calendar import SESSION_CLOSE, SESSION_OPEN, is_trading_day, previous_trading_day
from nadi.times import IST, day_bounds
from pipelines.jobs import (
    IN_PROGRESS_RUN_STATUSES,
    candle_refresh_job,
    candles_job,
    eod_reconciliation_job,
    replay_job,
    storage_job,
)
from pipelines.partitions import partition_key

TZ = "Asia/Kolkata"
# The last window (15:25-15:30) is refreshed after the close too.
_INTRADAY_UNTIL = (datetime.combine(datetime.min, SESSION_CLOSE) + timedelta(minutes=5)).time()


# Every schedule: IST wall-clock crons, running as soon as the code location loads.
_schedule = partial(schedule, execution_timezone=TZ, default_status=DefaultScheduleStatus.RUNNING)


def _now(context: ScheduleEvaluationContext) -> datetime:
    return context.scheduled_execution_time.astimezone(IST)


@_schedule(
    job=candles_job,
    cron_schedule="* 9-15 * * 1-5",
    description="Every minute 09:15-15:35 IST on trading days: refresh today's dirty candles.",
)
def candles_intraday_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    now = _now(context)
    if not is_trading_day(now.date()):
        return SkipReason(f"{now.date()} is not a trading day")
    if not SESSION_OPEN <= now.time() <= _INTRADAY_UNTIL:
        return SkipReason("outside market hours")
    key = partition_key(now.date())
    # Minute cadence: never queue a refresh behind one that is still running.
    running = context.instance.get_runs(
        RunsFilter(
            job_name=candles_job.name,
            statuses=list(IN_PROGRESS_RUN_STATUSES),
            tags={"dagster/partition": key},
        ),
        limit=1,
    )
    if running:
        return SkipReason("the previous refresh is still running")
    return RunRequest(
        partition_key=key, run_config={"ops": {"candles": {"config": {"full": False}}}}
    )


@_schedule(
    job=eod_reconciliation_job,
    cron_schedule="0 16 * * 1-5",
    description="16:00 IST on trading days: reconcile the day with the bhavcopy.",
)
def eod_reconciliation_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    day = _now(context).date()
    if not is_trading_day(day):
        return SkipReason(f"{day} is not a trading day")
    return RunRequest(run_key=f"eod-{day}", partition_key=partition_key(day))


def last_trading_day(now: datetime) -> datetime:
    """Start of the most recent trading day whose session has closed by ``now`` (IST)."""
    d = now.date()
    if not (is_trading_day(d) and now.time() >= SESSION_CLOSE):
        d = previous_trading_day(d)
    return day_bounds(d)[0]


@_schedule(
    job=replay_job,
    cron_schedule="0 20 * * *",
    description="20:00 IST nightly: replay the last trading day into the replay topic.",
)
def replay_nightly_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    start = last_trading_day(_now(context))
    end = start + timedelta(days=1)
    return RunRequest(
        run_key=f"replay-{start.date()}",
        run_config={
            "ops": {
                "ticks_replay": {
                    "config": {"start": start.isoformat(), "end": end.isoformat(), "speed": 0.0}
                }
            }
        },
        tags={"nadi/trading_day": start.date().isoformat()},
    )


@_schedule(
    job=storage_job,
    cron_schedule="30 18 * * *",
    description=("18:30 IST daily: migrations, retention, compression, candle refresh, ANALYZE."),
)
def storage_maintenance_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    return RunRequest(run_key=f"storage-{_now(context).date()}")


@_schedule(
    job=candle_refresh_job,
    cron_schedule="*/10 * * * *",
    description=(
        "Every 10 minutes, every day: refresh the candles of windows marked on any day (late "
        "ticks, repairs, back-filled history); the API serves them from raw ticks until then."
    ),
)
def candle_refresh_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    running = context.instance.get_runs(
        RunsFilter(job_name=candle_refresh_job.name, statuses=list(IN_PROGRESS_RUN_STATUSES)),
        limit=1,
    )
    if running:
        return SkipReason("the previous refresh is still running")
    return RunRequest()


all_schedules = [
    candle_refresh_schedule,
    candles_intraday_schedule,
    eod_reconciliation_schedule,
    replay_nightly_schedule,
    storage_maintenance_schedule,
]
