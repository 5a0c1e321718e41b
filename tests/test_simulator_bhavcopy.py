"""The simulated day's bhavcopy agrees with every tick the generator produced."""

from __future__ import annotations

import csv
from datetime import date, datetime
from pathlib import Path

import pytest

from nadi.instruments import bundled_instruments, round_to_tick
from nadi.times import IST, NS
from streaming.simulator.bhavcopy import COLUMNS, bhavcopy_rows, write_bhavcopy
from streaming.simulator.feed import FeedSimulator
from streaming.simulator.generator import DayGenerator

DAY = date(2026, 11, 20)
MASTER = bundled_instruments(DAY)
INSTS = [i for i in MASTER if i.tradingsymbol in ("RELIANCE", "TCS")] + [
    i for i in MASTER if i.instrument_type in ("FUT", "CE")
][:5]


def test_rows_match_the_generated_ticks_including_dropped_ones() -> None:
    gen = DayGenerator(INSTS, 11, DAY, density=4.0)
    feed = FeedSimulator(11, DAY, gap_rate=0.05)
    list(feed.messages(gen.stream()))
    assert feed.stats.gaps > 100  # what the feed dropped still counts in the exchange's file
    rows = {r["FinInstrmId"]: r for r in bhavcopy_rows(gen)}
    assert len(rows) == len(INSTS)
    win = int(datetime.combine(DAY, datetime.min.time().replace(hour=15), IST).timestamp()) * NS
    for inst in INSTS:
        ticks = gen.ticks(inst.instrument_token, 1, 10**7)
        r = rows[str(inst.exchange_token)]
        prices = [t.last_price for t in ticks]
        qty = [t.last_qty or 0 for t in ticks]
        tail = [(t.last_price, t.last_qty or 0) for t in ticks if t.exchange_ts >= win]
        assert tail, "the last half hour always trades here"
        vwap = sum(p * q for p, q in tail) / sum(q for _, q in tail)
        assert float(r["ClsPric"]) == pytest.approx(round_to_tick(vwap, inst.tick_size), abs=1e-9)
        assert float(r["OpnPric"]) == prices[0] and float(r["LastPric"]) == prices[-1]
        assert float(r["HghPric"]) == max(prices) and float(r["LwPric"]) == min(prices)
        assert int(r["TtlTradgVol"]) == sum(qty) == ticks[-1].volume
        assert int(r["TtlNbOfTxsExctd"]) == len(ticks)
        assert float(r["TtlTrfVal"]) == pytest.approx(
            sum(p * q for p, q in zip(prices, qty, strict=True)), rel=1e-9
        )
        assert r["TradDt"] == r["BizDt"] == "2026-11-20" and r["NewBrdLotQty"] == str(inst.lot_size)
        if inst.is_derivative:
            assert r["Sgmt"] == "FO" and r["FinInstrmTp"] in ("IDF", "IDO")
            assert int(r["OpnIntrst"]) == ticks[-1].oi
            assert r["XpryDt"] == (inst.expiry.isoformat() if inst.expiry else None)
        else:
            assert (r["Sgmt"], r["FinInstrmTp"], r["SctySrs"], r["OpnIntrst"]) == (
                "CM",
                "STK",
                "EQ",
                "",
            )
    # close is the last-30-minute VWAP, not the last trade: they differ for most instruments
    assert sum(r["ClsPric"] != r["LastPric"] for r in rows.values()) >= len(rows) // 2


def test_file_has_nse_name_and_columns(tmp_path: Path) -> None:
    gen = DayGenerator(INSTS[:2], 3, DAY, density=1.0)
    p = write_bhavcopy(gen, tmp_path / "bhav")
    assert p.name == "BhavCopy_NSE_CM_0_0_0_20261120_F_0000.csv"
    with p.open() as f:
        rd = csv.DictReader(f)
        assert tuple(rd.fieldnames or ()) == COLUMNS
        assert [r["TckrSymb"] for r in rd] == ["RELIANCE", "TCS"]


def test_live_days_have_no_bhavcopy() -> None:
    gen = DayGenerator(INSTS, 3, mode="live", anchor_ns=1_795_146_303 * NS, rate=10.0)
    with pytest.raises(ValueError):
        bhavcopy_rows(gen)
