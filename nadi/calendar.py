"""The NSE trading calendar (Asia/Kolkata): trading days, holidays and the 09:15–15:30 session.

Holidays come from pandas_market_calendars' ``XNSE`` calendar. Outside the years that calendar
has holiday data for (it is published a year at a time), every weekday counts as a trading day:
a guess, but one that keeps daily partitions and the simulator working for future dates.
Special weekend sessions (Muhurat trading, budget-day Saturdays) are not trading days here.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from functools import lru_cache

from nadi.times import IST, NS

SESSION_OPEN = time(9, 15)
SESSION_CLOSE = time(15, 30)
SESSION_SECONDS = 22_500  # 09:15 -> 15:30


@lru_cache(maxsize=1)
def _calendar() -> object:
    import pandas_market_calendars as mcal  # slow import, only when a calendar is needed

    return mcal.get_calendar("XNSE")


@lru_cache(maxsize=1)
def _known_days() -> tuple[date, date, frozenset[date]]:
    """(first, last, trading days) over the years the calendar has holiday data for."""
    cal = _calendar()
    holidays = [d.astype("datetime64[D]").item() for d in cal.holidays().holidays]  # type: ignore[attr-defined]
    last_year = max(h.year for h in holidays)
    first, last = date(1995, 1, 1), date(last_year, 12, 31)
    valid = cal.valid_days(first.isoformat(), last.isoformat())  # type: ignore[attr-defined]
    days = frozenset(ts.date() for ts in valid)
    return first, last, days


def is_trading_day(d: date) -> bool:
    """True when NSE's cash market trades on ``d`` (an IST calendar date)."""
    first, last, days = _known_days()
    if first <= d <= last:
        return d in days
    return d.weekday() < 5  # no holiday data: weekdays-only fallback


def trading_days(start: date, end: date) -> list[date]:
    """Trading days in ``[start, end]``, both ends included, ascending."""
    out: list[date] = []
    d = start
    while d <= end:
        if is_trading_day(d):
            out.append(d)
        d += timedelta(days=1)
    return out


def previous_trading_day(d: date) -> date:
    """The last trading day strictly before ``d``."""
    p = d - timedelta(days=1)
    while not is_trading_day(p):
        p -= timedelta(days=1)
    return p


def next_trading_day(d: date) -> date:
    """The first trading day strictly after ``d``."""
    n = d + timedelta(days=1)
    while not is_trading_day(n):
        n += timedelta(days=1)
    return n


def session_bounds(d: date) -> tuple[datetime, datetime]:
    """The normal market session of ``d``: 09:15 and 15:30 IST as aware datetimes."""
    return datetime.combine(d, SESSION_OPEN, IST), datetime.combine(d, SESSION_CLOSE, IST)


def session_bounds_ns(d: date) -> tuple[int, int]:
    """:func:`session_bounds` as UTC epoch nanoseconds."""
    o, c = session_bounds(d)
    return int(o.timestamp()) * NS, int(c.timestamp()) * NS


def today_ist() -> date:
    """Today's date in Asia/Kolkata."""
    return datetime.now(IST).date()
