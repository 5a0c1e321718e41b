"""The instrument master: bundled rows, Kite CSV loading, the upsert into PostgreSQL."""

from __future__ import annotations

from datetime import date, timedelta
from itertools import pairwise

import asyncpg
from hypothesis import given
from hypothesis import strategies as st

from nadi.calendar import is_trading_day
from nadi.instruments import (
    Instrument,
    bundled_instruments,
    derivatives_for,
    load_kite_csv,
    monthly_expiry,
    to_kite_csv,
    upsert_instruments,
    weekly_expiry,
)

DAY = date(2026, 11, 20)


def _on_tick(price: float, tick: float) -> bool:
    return abs(price / tick - round(price / tick)) < 1e-6


def test_bundled_master_is_nifty50_plus_nfo_strip() -> None:
    master = bundled_instruments(DAY)
    eq = [i for i in master if i.instrument_type == "EQ"]
    fut = [i for i in master if i.instrument_type == "FUT"]
    opt = [i for i in master if i.instrument_type in ("CE", "PE")]
    assert len(eq) == 50 and len(fut) == 2 and len(opt) == 42
    assert len({i.instrument_token for i in master}) == len(master)
    by_sym = {i.tradingsymbol: i for i in eq}
    assert by_sym["RELIANCE"].instrument_token == 738561
    assert by_sym["INFY"].instrument_token == 408065
    assert by_sym["TCS"].instrument_token == 2953217
    for i in eq:
        assert (i.exchange, i.segment, i.instrument_token) == (
            "NSE",
            "NSE",
            i.exchange_token * 256 + 1,
        )
        assert i.expiry is None and i.strike is None and i.lot_size == 1
    for i in fut + opt:
        assert i.exchange == "NFO" and i.instrument_token == i.exchange_token * 256 + 2
        assert 35_000 <= i.exchange_token <= 70_000
    for i in master:
        assert i.last_price > 0 and _on_tick(i.last_price, i.tick_size)
    assert {f.name: f.lot_size for f in fut} == {"NIFTY": 75, "BANKNIFTY": 35}
    strikes = sorted({o.strike for o in opt if o.strike is not None})
    assert len(strikes) == 21 and all(b - a == 50 for a, b in pairwise(strikes))
    assert {o.instrument_type for o in opt} == {"CE", "PE"}


def test_expiries_follow_the_tuesday_rules() -> None:
    assert monthly_expiry(date(2026, 10, 1)) == date(2026, 10, 27)  # last Tuesday of October
    # Nov 24 2026 is a holiday: the expiry moves to Monday 23, and on the 24th December's is current
    assert monthly_expiry(date(2026, 11, 20)) == date(2026, 11, 23)
    assert monthly_expiry(date(2026, 11, 24)) == date(2026, 12, 29)
    assert weekly_expiry(date(2026, 11, 25)) == date(2026, 12, 1)
    assert weekly_expiry(date(2026, 12, 1)) == date(2026, 12, 1)  # expiry day itself


@given(st.dates(min_value=date(2024, 1, 1), max_value=date(2030, 12, 31)))
def test_derivatives_are_consistent_for_any_day(d: date) -> None:
    ds = derivatives_for(d)
    assert len({i.instrument_token for i in ds}) == len(ds) == 44
    for i in ds:
        assert i.expiry is not None and i.expiry >= d and is_trading_day(i.expiry)
    wk = ds[-1].expiry
    assert wk is not None and wk - d < timedelta(days=8)


def test_contract_tokens_are_stable_across_days() -> None:
    a = {i.tradingsymbol: i.instrument_token for i in derivatives_for(date(2026, 11, 25))}
    b = {i.tradingsymbol: i.instrument_token for i in derivatives_for(date(2026, 11, 26))}
    assert a == b


KITE_SAMPLE = """instrument_token,exchange_token,tradingsymbol,name,last_price,expiry,strike,tick_size,lot_size,instrument_type,segment,exchange,extra
738561,2885,RELIANCE,"RELIANCE INDUSTRIES",0,,0,0.1,1,EQ,NSE,NSE,zz
256265,1001,NIFTY 50,,0,,,0,0,EQ,INDICES,NSE,
12345602,48225,NIFTY25D0924000CE,"NIFTY",105.5,2025-12-09,24000,0.05,75,CE,NFO-OPT,NFO,
"""


def test_kite_csv_loader_tolerates_blanks_and_extra_columns() -> None:
    rows = load_kite_csv(KITE_SAMPLE)
    assert [r.tradingsymbol for r in rows] == ["RELIANCE", "NIFTY 50", "NIFTY25D0924000CE"]
    rel, idx, opt = rows
    assert rel.expiry is None and rel.strike is None and rel.last_price == 0.0
    assert (
        idx.tick_size == 0.05 and idx.lot_size == 1 and idx.segment == "INDICES"
    )  # zeros -> defaults
    assert opt.expiry == date(2025, 12, 9) and opt.strike == 24000.0 and opt.lot_size == 75
    assert load_kite_csv(to_kite_csv(rows)) == rows


def test_kite_csv_loader_reads_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "instruments.csv"
    p.write_text(KITE_SAMPLE)
    assert load_kite_csv(p) == load_kite_csv(str(p)) == load_kite_csv(KITE_SAMPLE)


async def test_upsert_inserts_then_updates(pg: asyncpg.Connection) -> None:
    master = bundled_instruments(DAY)
    await pg.execute("DELETE FROM instruments")
    assert await upsert_instruments(pg, master) == len(master)
    assert await pg.fetchval("SELECT count(*) FROM instruments") == len(master)
    rel = next(i for i in master if i.tradingsymbol == "RELIANCE")
    moved = Instrument(
        **{**{f: getattr(rel, f) for f in rel.__struct_fields__}, "last_price": 1500.5}
    )
    new = load_kite_csv(KITE_SAMPLE)[2]
    assert await upsert_instruments(pg, [moved, new, new]) == 2  # a repeated token keeps one row
    row = await pg.fetchrow("SELECT * FROM instruments WHERE instrument_token = 738561")
    assert row is not None and row["last_price"] == 1500.5 and row["exchange_token"] == 2885
    opt = await pg.fetchrow("SELECT * FROM instruments WHERE instrument_token = 12345602")
    assert opt is not None and opt["expiry"] == date(2025, 12, 9) and opt["strike"] == 24000.0
    assert opt["segment"] == "NFO-OPT" and opt["lot_size"] == 75
    fut = next(i for i in master if i.instrument_type == "FUT")
    frow = await pg.fetchrow(
        "SELECT * FROM instruments WHERE instrument_token = $1", fut.instrument_token
    )
    assert frow is not None and frow["expiry"] == fut.expiry and frow["strike"] is None
    assert await pg.fetchval("SELECT count(*) FROM instruments") == len(master) + 1
    assert await upsert_instruments(pg, []) == 0
