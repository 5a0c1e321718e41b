"""The simulated day's two bhavcopy files agree with every tick the generator produced."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pytest

from nadi.bhavcopy import parse_bhavcopy
from nadi.instruments import bundled_instruments, round_to_tick
from nadi.times import IST, NS
from streaming.simulator.bhavcopy import BLOCK_ID_OFFSET, bhavcopy_rows, sim_isin, write_bhavcopy
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
    by_seg = bhavcopy_rows(gen)
    rows = {r.fin_instrm_id: r for seg in by_seg.values() for r in seg if r.scty_srs != "BL"}
    assert len(rows) == len(INSTS)
    win = int(datetime.combine(DAY, datetime.min.time().replace(hour=15), IST).timestamp()) * NS
    for inst in INSTS:
        ticks = gen.ticks(inst.instrument_token, 1, 10**7)
        r = rows[inst.exchange_token]
        prices = [t.last_price for t in ticks]
        qty = [t.last_qty or 0 for t in ticks]
        tail = [(t.last_price, t.last_qty or 0) for t in ticks if t.exchange_ts >= win]
        assert tail, "the last half hour always trades here"
        vwap = sum(p * q for p, q in tail) / sum(q for _, q in tail)
        assert r.cls_pric == pytest.approx(round_to_tick(vwap, inst.tick_size), abs=1e-9)
        assert r.sttlm_pric == r.cls_pric
        assert r.opn_pric == prices[0] and r.last_pric == prices[-1]
        assert r.hgh_pric == max(prices) and r.lw_pric == min(prices)
        assert r.volume_shares == sum(qty) == ticks[-1].volume
        assert r.ttl_nb_of_txs_exctd == len(ticks)
        assert r.trad_dt == r.biz_dt == DAY and r.new_brd_lot_qty == inst.lot_size
        if inst.is_derivative:
            assert r.sgmt == "FO" and r.fin_instrm_tp in ("IDF", "IDO") and r.isin is None
            assert r.ttl_tradg_vol * inst.lot_size == sum(qty)  # contracts, as NSE counts
            assert r.opn_intrst == ticks[-1].oi and r.xpry_dt == inst.expiry
            assert r.fin_instrm_nm == inst.tradingsymbol
            if inst.instrument_type == "CE":
                assert (r.optn_tp, r.strk_pric) == ("CE", inst.strike)
                assert r.ttl_trf_val == pytest.approx(
                    sum((p + (inst.strike or 0)) * q for p, q in zip(prices, qty, strict=True)),
                    rel=1e-9,
                )  # notional turnover
        else:
            assert (r.sgmt, r.fin_instrm_tp, r.scty_srs, r.opn_intrst) == ("CM", "STK", "EQ", None)
            assert r.ttl_tradg_vol == sum(qty) and r.isin == sim_isin(inst)
            assert r.fin_instrm_nm == inst.name and r.tckr_symb == inst.tradingsymbol
            assert r.ttl_trf_val == pytest.approx(
                sum(p * q for p, q in zip(prices, qty, strict=True)), rel=1e-9
            )
    # close is the last-30-minute VWAP, not the last trade: they differ for most instruments
    assert sum(r.cls_pric != r.last_pric for r in rows.values()) >= len(rows) // 2


def test_two_zipped_files_with_nse_names(tmp_path: Path) -> None:
    gen = DayGenerator(INSTS, 3, DAY, density=1.0)
    paths = write_bhavcopy(gen, tmp_path / "bhav")
    assert [p.name for p in paths] == [
        "BhavCopy_NSE_CM_0_0_0_20261120_F_0000.csv.zip",
        "BhavCopy_NSE_FO_0_0_0_20261120_F_0000.csv.zip",
    ]
    cm = parse_bhavcopy(paths[0].read_bytes(), "CM", DAY)
    fo = parse_bhavcopy(paths[1].read_bytes(), "FO", DAY)
    assert [r.tckr_symb for r in cm if r.scty_srs == "EQ"] == ["RELIANCE", "TCS"]
    assert {r.fin_instrm_nm for r in fo} == {i.tradingsymbol for i in INSTS if i.is_derivative}


def test_block_deal_rows_share_the_isin_not_the_token() -> None:
    stocks = [i for i in MASTER if not i.is_derivative]
    gen = DayGenerator(stocks, 5, DAY, density=1.0)
    cm = bhavcopy_rows(gen)["CM"]
    eq = {r.isin: r for r in cm if r.scty_srs == "EQ"}
    bl = [r for r in cm if r.scty_srs == "BL"]
    assert 2 <= len(bl) <= 20  # about one stock in six
    for r in bl:
        twin = eq[r.isin]
        assert r.fin_instrm_id == BLOCK_ID_OFFSET + twin.fin_instrm_id != twin.fin_instrm_id
        assert r.ttl_trf_val is not None and r.ttl_trf_val >= 10e7 * (r.ttl_nb_of_txs_exctd or 0)
    assert bhavcopy_rows(gen)["CM"] == cm  # a pure function of the seed


def test_live_days_have_no_bhavcopy() -> None:
    gen = DayGenerator(INSTS, 3, mode="live", anchor_ns=1_795_146_303 * NS, rate=10.0)
    with pytest.raises(ValueError):
        bhavcopy_rows(gen)
