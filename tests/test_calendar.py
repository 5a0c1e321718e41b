"""The NSE trading calendar (pure logic, no services)."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from nadi.calendar import (
    is_trading_day,
    next_trading_day,
    previous_trading_day,
    session_bounds,
    session_bounds_ns,
    trading_days,
)
from nadi.times import IST


def test_known_holidays_and_weekends_are_not_trading_days() -> None:
    assert not is_trading_day(date(2026, 1, 26))  # Republic Day, a Monday
    assert not is_trading_day(date(2025, 10, 2))  # Gandhi Jayanti, a Thursday
    assert not is_trading_day(date(2026, 11, 21))  # Saturday
    assert is_trading_day(date(2026, 11, 20))  # an ordinary Friday
    assert is_trading_day(date(2026, 1, 27))


def test_years_without_holiday_data_fall_back_to_weekdays() -> None:
    assert is_trading_day(date(2031, 1, 6))  # Monday
    assert not is_trading_day(date(2031, 1, 4))  # Saturday
    assert trading_days(date(2031, 3, 3), date(2031, 3, 9)) == [
        date(2031, 3, d) for d in range(3, 8)
    ]


def test_trading_days_and_neighbours() -> None:
    days = trading_days(date(2026, 1, 22), date(2026, 1, 28))
    assert days == [date(2026, 1, 22), date(2026, 1, 23), date(2026, 1, 27), date(2026, 1, 28)]
    assert previous_trading_day(date(2026, 1, 27)) == date(2026, 1, 23)
    assert next_trading_day(date(2026, 1, 23)) == date(2026, 1, 27)
    assert trading_days(date(2026, 1, 28), date(2026, 1, 22)) == []


def test_session_bounds_are_ist_0915_to_1530() -> None:
    o, c = session_bounds(date(2026, 11, 20))
    assert o.tzinfo is IST and (o.hour, o.minute, c.hour, c.minute) == (9, 15, 15, 30)
    assert (c - o) == timedelta(hours=6, minutes=15)
    assert o.utcoffset() == timedelta(hours=5, minutes=30)
    o_ns, c_ns = session_bounds_ns(date(2026, 11, 20))
    assert o_ns == int(o.timestamp()) * 10**9 and c_ns - o_ns == 22_500 * 10**9


@given(st.dates(min_value=date(2000, 1, 1), max_value=date(2035, 12, 31)))
def test_previous_trading_day_is_the_nearest_earlier_one(d: date) -> None:
    p = previous_trading_day(d)
    assert p < d and is_trading_day(p) and p.weekday() < 5
    assert trading_days(p + timedelta(days=1), d - timedelta(days=1)) == []
