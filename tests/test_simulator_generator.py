"""The deterministic tick generator: determinism, exact regeneration, shapes of the data."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import date, datetime

import pytest

from nadi.calendar import session_bounds_ns
from nadi.instruments import Instrument, bundled_instruments
from nadi.tick import Tick
from nadi.times import IST, NS, ist_date, ist_midnight_ns
from streaming.simulator.generator import BLOCK, DayGenerator

DAY = date(2026, 11, 20)
MASTER = bundled_instruments(DAY)
# A cash stock, both index futures and a few options: every code path, small enough to be fast.
SMALL = (
    [i for i in MASTER if i.tradingsymbol in ("RELIANCE", "WIPRO", "MARUTI")]
    + [i for i in MASTER if i.instrument_type == "FUT"]
    + [i for i in MASTER if i.instrument_type in ("CE", "PE")][18:24]
)


def _gen(
    seed: int = 7, instruments: list[Instrument] = SMALL, density: float = 5.0
) -> DayGenerator:
    return DayGenerator(instruments, seed, DAY, density=density)


def _by_token(ticks: list[Tick]) -> dict[int, list[Tick]]:
    out: dict[int, list[Tick]] = defaultdict(list)
    for t in ticks:
        out[t.instrument_token].append(t)
    return out


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    a = list(_gen(7).stream(max_ticks=20_000))
    assert a == list(_gen(7).stream(max_ticks=20_000))
    b = list(_gen(8).stream(max_ticks=20_000))
    assert [t.last_price for t in a[:200]] != [t.last_price for t in b[:200]]


def test_ticks_range_equals_the_stream_slice_across_blocks() -> None:
    g = _gen()
    per = _by_token(list(g.stream()))
    fut = next(i for i in SMALL if i.instrument_type == "FUT" and i.name == "NIFTY")
    stream = per[fut.instrument_token]
    assert len(stream) > 2 * BLOCK + 10  # the range below crosses block boundaries
    fresh = _gen()  # no cached checkpoints: regeneration from the seed alone
    lo, hi = BLOCK - 5, 2 * BLOCK + 7
    assert fresh.ticks(fut.instrument_token, lo, hi) == stream[lo - 1 : hi]
    assert fresh.ticks(fut.instrument_token, 1, 1) == stream[:1]
    n = len(stream)
    assert fresh.ticks(fut.instrument_token, n - 2, n + 500) == stream[-3:]  # truncated at the end
    assert fresh.ticks(fut.instrument_token, n + 1, n + 10) == []
    for tok, ticks in per.items():
        assert [t.sequence_id for t in ticks] == list(range(1, len(ticks) + 1)), tok


def test_tick_fields_are_realistic() -> None:
    g = _gen()
    ticks = list(g.stream())
    open_ns, close_ns = session_bounds_ns(DAY)
    assert [t.exchange_ts for t in ticks] == sorted(t.exchange_ts for t in ticks)
    insts = {i.instrument_token: i for i in SMALL}
    for tok, ts in _by_token(ticks).items():
        inst = insts[tok]
        vol = 0
        for t in ts:
            assert open_ns <= t.exchange_ts < close_ns
            assert t.exchange == inst.exchange
            for p in (t.last_price, t.bid, t.ask):
                assert p is not None and p > 0
                assert abs(p / inst.tick_size - round(p / inst.tick_size)) < 1e-6, (
                    inst.tradingsymbol,
                    p,
                )
            assert t.bid is not None and t.ask is not None
            assert t.bid <= t.last_price <= t.ask
            assert 1 <= round((t.ask - t.bid) / inst.tick_size) <= 3
            assert t.last_qty is not None and t.last_qty > 0
            assert t.bid_qty and t.ask_qty
            vol += t.last_qty
            assert t.volume == vol
            if inst.is_derivative:
                assert (
                    t.last_qty % inst.lot_size == 0
                    and t.oi is not None
                    and t.oi % inst.lot_size == 0
                )
            else:
                assert t.oi is None
        # the walk moves, but not absurdly: within 30% of the base for stocks/futures
        prices = [t.last_price for t in ts]
        assert len(set(prices)) > 10
        if inst.instrument_type not in ("CE", "PE"):
            assert 0.7 * inst.last_price < min(prices) <= max(prices) < 1.3 * inst.last_price


def test_busy_instruments_tick_more() -> None:
    per = _by_token(list(_gen().stream()))
    counts = {i.tradingsymbol: len(per[i.instrument_token]) for i in SMALL}
    fut = next(i.tradingsymbol for i in SMALL if i.instrument_type == "FUT" and i.name == "NIFTY")
    assert counts[fut] > 2 * counts["RELIANCE"] > 2 * counts["WIPRO"]


def _minute_of_session(ts_ns: int) -> float:
    return (ts_ns - session_bounds_ns(DAY)[0]) / NS / 60


def test_intraday_intensity_is_u_shaped() -> None:
    ticks = list(_gen(density=3.0).stream())
    m = [_minute_of_session(t.exchange_ts) for t in ticks]
    first = sum(1 for x in m if x < 30)
    midday = sum(1 for x in m if 180 <= x < 210)  # 12:15-12:45
    last = sum(1 for x in m if x >= 345)
    assert first > 2 * midday and last > 1.5 * midday
    # density is ticks per exchange-second over all instruments
    assert abs(len(ticks) / 22_500 - 3.0) < 0.3


def test_live_mode_is_flat_anchored_and_ends_at_ist_midnight() -> None:
    anchor = time.time_ns()
    g = DayGenerator(SMALL, 3, mode="live", anchor_ns=anchor, rate=500.0)
    assert g.trading_day == ist_date(anchor)
    ticks = list(g.stream(until_ns=anchor + 20 * NS))
    assert ticks[0].exchange_ts >= anchor and ticks[-1].exchange_ts < anchor + 20 * NS
    assert 0.85 * 10_000 < len(ticks) < 1.15 * 10_000  # 500/s for 20 s
    first = sum(1 for t in ticks if t.exchange_ts < anchor + 10 * NS)
    assert 0.85 < first / (len(ticks) - first) < 1.15  # flat, not U-shaped
    # anchored 30 s before IST midnight: the day's stream stops at midnight
    midnight = ist_midnight_ns(date(2026, 11, 21))
    late = DayGenerator(SMALL, 3, mode="live", anchor_ns=midnight - 30 * NS, rate=200.0)
    assert late.trading_day == date(2026, 11, 20)
    rest = list(late.stream())
    assert 0.8 * 6000 < len(rest) < 1.2 * 6000 and rest[-1].exchange_ts < midnight
    tok = rest[0].instrument_token
    assert late.ticks(tok, 1, 10**6) == [t for t in rest if t.instrument_token == tok]


def test_session_mode_refuses_holidays_and_bad_parameters() -> None:
    with pytest.raises(ValueError, match="not an NSE trading day"):
        DayGenerator(SMALL, 1, date(2026, 11, 24))
    with pytest.raises(ValueError):
        DayGenerator(SMALL, -1, DAY)
    with pytest.raises(ValueError):
        DayGenerator(SMALL, 1, mode="live")
    with pytest.raises(ValueError):
        DayGenerator(SMALL + SMALL[:1], 1, DAY)


def test_instrument_set_is_part_of_the_generator_identity() -> None:
    """Rates are shares of the total, so regenerating needs the same instrument set."""
    rel = [i for i in SMALL if i.tradingsymbol == "RELIANCE"]
    alone = DayGenerator(rel, 7, DAY, density=5.0).ticks(rel[0].instrument_token, 1, 50)
    assert alone != _gen().ticks(rel[0].instrument_token, 1, 50)
    assert datetime.fromtimestamp(alone[0].exchange_ts / NS, IST).hour == 9
