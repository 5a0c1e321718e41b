"""Daily partitions on NSE trading days (Asia/Kolkata), holidays excluded.

A :class:`TimeWindowPartitionsDefinition` on a weekday cron with the exchange holidays of
:mod:`nadi.calendar` as exclusions, rather than a static list: new trading days appear by
themselves, and the UI offers range backfills over a time axis. ``end_offset=1`` adds the day
in progress, which the market-hours schedule keeps fresh.

A partition's *time window* in Dagster runs to the next cron tick, so Friday's window spans the
weekend and the eve of a holiday spans the holiday. Nadi's data is per trading day (the IST date
of ``exchange_ts``), so code derives the day's bounds from the partition *key* with
:func:`day_bounds`, never from the time window.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from functools import partial

from dagster import BackfillPolicy, TimeWindowPartitionsDefinition, asset

from nadi.calendar import is_trading_day, today_ist

PARTITIONS_START = date(2025, 1, 1)
KEY_FORMAT = "%Y-%m-%d"
# Holidays are looked up this far ahead of today when the definitions load; the code location
# is reloaded far more often than that (every deploy, every `nadi up`).
_HORIZON_DAYS = 400


def _holidays(start: date, end: date) -> list[datetime]:
    """Weekdays in ``[start, end]`` that are not trading days, as IST midnights."""
    out: list[datetime] = []
    d = start
    while d <= end:
        if d.weekday() < 5 and not is_trading_day(d):
            out.append(datetime.combine(d, time(0)))
        d += timedelta(days=1)
    return out


def build_trading_day_partitions(
    start: date = PARTITIONS_START, today: date | None = None
) -> TimeWindowPartitionsDefinition:
    """The trading-day partitions from ``start`` through today (IST)."""
    end = (today or today_ist()) + timedelta(days=_HORIZON_DAYS)
    return TimeWindowPartitionsDefinition(
        cron_schedule="0 0 * * 1-5",
        start=datetime.combine(start, time(0)),
        timezone="Asia/Kolkata",
        fmt=KEY_FORMAT,
        end_offset=1,
        exclusions=_holidays(start, end),
    )


trading_days = build_trading_day_partitions()


def partition_key(d: date) -> str:
    """The partition key of a trading day."""
    return d.strftime(KEY_FORMAT)


def key_to_day(key: str) -> date:
    """The trading day of a partition key."""
    return datetime.strptime(key, KEY_FORMAT).date()


# The decorator of a quality asset of one trading day (gap repair, EOD reconciliation):
# partitioned by day, backfilled ten days a run. Each gives its ``nadi/kind`` op tag (the queued
# coordinator's limits key on it).
quality_asset = partial(
    asset,
    group_name="quality",
    partitions_def=trading_days,
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=10),
)
