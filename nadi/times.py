"""Time in one place: the Asia/Kolkata zone, the epoch, and exact conversions between aware
datetimes, UTC epoch micro/nanoseconds and trading-day ordinals.

Asia/Kolkata is UTC+05:30 all year (no DST), so a fixed offset is exact for every instant; the
``ZoneInfo`` is still used where a datetime is built, so its repr names the zone. All integer
conversions are exact (``datetime.timestamp`` goes through a float and can round).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

IST = ZoneInfo("Asia/Kolkata")
IST_OFFSET_S = 19_800  # UTC+05:30, no DST
NS = 1_000_000_000  # nanoseconds per second
US = 1_000_000  # microseconds per second
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_ORDINAL = 719_163  # date(1970, 1, 1).toordinal()
_MICROSECOND = timedelta(microseconds=1)


def to_epoch_us(dt: datetime) -> int:
    """Aware datetime -> UTC epoch microseconds (exact)."""
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds


def to_datetime_us(us: int) -> datetime:
    """UTC epoch microseconds -> aware datetime (exact; ``datetime.fromtimestamp`` rounds)."""
    return EPOCH + timedelta(microseconds=us)


def to_epoch_ns(dt: datetime) -> int:
    """Aware datetime -> UTC epoch nanoseconds (exact integer arithmetic, no float rounding)."""
    return (dt - EPOCH) // _MICROSECOND * 1000


def trading_day_ordinal(epoch_ns: int) -> int:
    """Days since 1970-01-01 of the Asia/Kolkata calendar date of a UTC epoch-ns timestamp."""
    return (epoch_ns // NS + IST_OFFSET_S) // 86_400


def ordinal_date(ordinal: int) -> date:
    """The date ``ordinal`` days after 1970-01-01 (inverse of :func:`date_ordinal`)."""
    return date.fromordinal(EPOCH_ORDINAL + ordinal)


def date_ordinal(d: date) -> int:
    """Days since 1970-01-01 of ``d``."""
    return d.toordinal() - EPOCH_ORDINAL


def ist_date(epoch_ns: int) -> date:
    """The Asia/Kolkata calendar date of a UTC epoch-nanosecond instant."""
    return datetime.fromtimestamp(epoch_ns // NS, IST).date()


def ist_midnight_ns(d: date) -> int:
    """00:00 IST of ``d`` as UTC epoch nanoseconds."""
    return int(datetime.combine(d, time(0), IST).timestamp()) * NS


def day_bounds(d: date) -> tuple[datetime, datetime]:
    """``[00:00 IST of d, 00:00 IST of d + 1)``: every tick of the trading day ``d``."""
    start = datetime.combine(d, time(0), IST)
    return start, start + timedelta(days=1)
