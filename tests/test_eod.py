"""The reconciliation's rules (nadi/eod.py), on hand-made rows: keys, scope, units, verdicts."""

from __future__ import annotations

from datetime import date

import msgspec
import pytest

from nadi.bhavcopy import BhavcopyRow
from nadi.eod import MasterEntry, NadiSummary, Tolerances, reconcile, worst_md

DAY = date(2026, 9, 1)
CM = BhavcopyRow(
    trad_dt=DAY, biz_dt=DAY, sgmt="CM", src="NSE", fin_instrm_tp="STK", fin_instrm_id=2885,
    isin="INE002A01018", tckr_symb="RELIANCE", scty_srs="EQ", xpry_dt=None,
    fininstrm_actl_xpry_dt=None, strk_pric=None, optn_tp=None,
    fin_instrm_nm="RELIANCE INDUSTRIES LTD", opn_pric=1318.0, hgh_pric=1328.0, lw_pric=1314.6,
    cls_pric=1318.1, last_pric=1316.5, prvs_clsg_pric=1313.6, undrlyg_pric=None,
    sttlm_pric=1318.1, opn_intrst=None, chng_in_opn_intrst=None, ttl_tradg_vol=1000,
    ttl_trf_val=1.0, ttl_nb_of_txs_exctd=10, ssn_id="F1", new_brd_lot_qty=1,
)  # fmt: skip
FO = msgspec.structs.replace(
    CM, sgmt="FO", fin_instrm_tp="IDF", fin_instrm_id=68407, isin=None, tckr_symb="NIFTY",
    scty_srs=None, fin_instrm_nm="NIFTY26SEPFUT", opn_pric=24200.0, hgh_pric=24296.1,
    lw_pric=24064.0, cls_pric=24090.3, last_pric=24081.0, sttlm_pric=24090.3,
    opn_intrst=16051815, ttl_tradg_vol=20, new_brd_lot_qty=65,
)  # fmt: skip
MASTER = [
    MasterEntry(738561, "NSE", 2885, "RELIANCE", 0.1),
    MasterEntry(68407 * 256 + 2, "NFO", 68407, "NIFTY26SEPFUT", 0.1),
    MasterEntry(408065, "NSE", 1594, "INFY", 0.1),  # in the master, in neither side today
]


def nadi_of(b: BhavcopyRow, token: int, **over: object) -> NadiSummary:
    n = NadiSummary(
        instrument_token=token, open=b.opn_pric, high=b.hgh_pric, low=b.lw_pric,
        last=b.last_pric, close_vwap=b.cls_pric + 0.01, volume=b.volume_shares,
        ticks=b.ttl_nb_of_txs_exctd or 0, oi=b.opn_intrst,
    )  # fmt: skip
    return msgspec.structs.replace(n, **over)


def test_both_segments_match_and_fo_volume_counts_contracts() -> None:
    nadi = {738561: nadi_of(CM, 738561), 68407 * 256 + 2: nadi_of(FO, 68407 * 256 + 2)}
    assert nadi[68407 * 256 + 2].volume == 20 * 65  # Nadi counts shares
    out = reconcile(DAY, [CM, FO], nadi, MASTER, Tolerances())
    assert [(r.tradingsymbol, r.segment, r.verdict) for r in out.rows] == [
        ("RELIANCE", "CM", "match"), ("NIFTY26SEPFUT", "FO", "match"),
    ]  # fmt: skip
    fo = out.rows[1]
    assert (fo.exch_volume, fo.exch_oi, fo.exch_settle, fo.nadi_settle) == (
        1300, 16051815, 24090.3, 24090.3,
    )  # fmt: skip
    assert out.rows[0].exch_oi is None and out.rows[0].exch_settle is None
    assert out.bhavcopy_rows == {"CM": 1, "FO": 1} and out.untracked == {}
    assert worst_md(out.rows).startswith("All 2 instruments")


@pytest.mark.parametrize(
    ("over", "fields"),
    [
        ({"high": 1330.0}, {"high"}),
        ({"close_vwap": 1318.4}, {"close"}),  # 3 ticks off, tolerance 1
        ({"volume": 999, "ticks": 9}, {"volume", "ticks"}),
        ({"open_gaps": 1}, {"open_gaps"}),
    ],
)
def test_each_difference_is_named(over: dict[str, object], fields: set[str]) -> None:
    out = reconcile(DAY, [CM], {738561: nadi_of(CM, 738561, **over)}, MASTER, Tolerances())
    (r,) = out.rows
    assert r.verdict == "mismatch" and set(r.details) == fields


def test_fo_oi_and_settlement_differences() -> None:
    tok = 68407 * 256 + 2
    out = reconcile(DAY, [FO], {tok: nadi_of(FO, tok, oi=16051815 - 65, close_vwap=24091.0)},
                    MASTER, Tolerances())  # fmt: skip
    (r,) = out.rows
    assert set(r.details) == {"oi", "settlement", "close"}
    assert r.details["oi"].diff == -65 and r.details["settlement"].diff == pytest.approx(0.7)
    assert "oi: 16051750 vs 16051815 (-65)" in worst_md(out.rows)


def test_scope_and_keys() -> None:
    bl = msgspec.structs.replace(CM, fin_instrm_id=902885, scty_srs="BL", opn_pric=1.0)
    other = msgspec.structs.replace(CM, fin_instrm_id=1594)  # INFY: in the master, no ticks
    lagging = msgspec.structs.replace(CM, fin_instrm_id=5900)  # not in the master, has ticks
    nadi = {738561: nadi_of(CM, 738561), 5900 * 256 + 1: nadi_of(CM, 5900 * 256 + 1),
            777 * 256 + 1: nadi_of(CM, 777 * 256 + 1)}  # fmt: skip
    out = reconcile(DAY, [CM, bl, other, lagging], nadi, MASTER, Tolerances())
    verdicts = {r.instrument_token: r.verdict for r in out.rows}
    names = {r.instrument_token: r.tradingsymbol for r in out.rows}
    assert names[5900 * 256 + 1] == "RELIANCE"  # no master row: the file's TckrSymb
    assert verdicts == {
        738561: "match",  # the EQ row, not confused with its BL twin
        408065: "missing_in_nadi",
        5900 * 256 + 1: "match",  # Kite's token rule covers a lagging master
        777 * 256 + 1: "missing_in_bhavcopy",  # an NSE token (Kite code 1) the file lacks
    }
    assert out.untracked == {"CM": 1}  # the BL row
    ticked = reconcile(DAY, [CM, bl, other, lagging], nadi, MASTER, Tolerances(), "ticked")
    assert 408065 not in {r.instrument_token for r in ticked.rows}
    assert ticked.untracked == {"CM": 2}


def test_only_the_reconciled_segments_and_nses_instruments() -> None:
    fo_tok = 68407 * 256 + 2
    nadi = {738561: nadi_of(CM, 738561), fo_tok: nadi_of(FO, fo_tok),
            12345 * 256 + 4: nadi_of(CM, 12345 * 256 + 4)}  # a BSE token (Kite code 4)  # fmt: skip
    out = reconcile(DAY, [FO], nadi, MASTER, Tolerances(), segments=("FO",))
    assert [(r.instrument_token, r.verdict) for r in out.rows] == [(fo_tok, "match")]
    both = reconcile(DAY, [CM, FO], nadi, MASTER, Tolerances())
    assert {r.instrument_token for r in both.rows} == {738561, fo_tok}
