"""End-of-day bhavcopy of a simulated session day: NSE's two UDiFF files (:mod:`nadi.bhavcopy`).

Computed from every tick the generator produced for the day, the ones the feed dropped
included: the exchange's file reflects all trades. Close (``ClsPric``) is the volume-weighted
average price of the trades between 15:00 and 15:30 IST rounded to the tick size (NSE's
closing-price rule, simplified), or the last price when there were none; the settlement price
(``SttlmPric``) is the close. Cash rows go to the ``CM`` file, derivatives to the ``FO`` file,
in NSE's units: F&O ``TtlTradgVol`` counts contracts, open interest is in shares, option
turnover is notional ((strike + premium) x quantity). Simplified: an option's ``UndrlygPric`` is
its index future's close (the simulator has no spot index), ``PrvsClsgPric`` the master's price.

Each instrument's ``FinInstrmId`` is its master ``exchange_token`` (Kite's exchange token is
NSE's token). The simulator has no ISINs: cash rows carry a placeholder ``INE`` + the token
(6 digits) + ``SIM``. Like NSE's file, the CM file also lists block-deal (``BL`` series) rows
for some stocks, on the ISIN of their ``EQ`` row but under their own ``FinInstrmId``
(:data:`BLOCK_ID_OFFSET` + the EQ token): trades of the block window, which the tick feed does
not carry, so those rows are untracked by the reconciliation.
"""

from __future__ import annotations

from datetime import datetime, time
from pathlib import Path

import numpy as np

from nadi.bhavcopy import (
    SEGMENTS,
    BhavcopyRow,
    Segment,
    bhavcopy_filename,
    encode_bhavcopy,
)
from nadi.instruments import Instrument, round_to_tick
from nadi.times import IST, NS
from streaming.simulator.generator import DayGenerator

CLOSE_WINDOW_START = time(15, 0)
BLOCK_ID_OFFSET = 900_000  # simulated BL-series FinInstrmId = this + the EQ row's token
_BLOCK_SHARE = 6  # one stock in six has block deals on a day


def _fin_type(inst: Instrument) -> str:
    if inst.instrument_type == "FUT":
        return "IDF"  # the generated futures are all on indices
    if inst.instrument_type in ("CE", "PE"):
        return "IDO"
    return "STK"


def sim_isin(inst: Instrument) -> str:
    """The placeholder ISIN of a simulated cash instrument (12 characters, visibly fake)."""
    return f"INE{inst.exchange_token % 1_000_000:06d}SIM"


def _block_rows(generator: DayGenerator, inst: Instrument, eq_open: float) -> list[BhavcopyRow]:
    """The day's BL row of ``inst``, if it had block deals (a pure function of the seed)."""
    day = generator.trading_day
    rng = np.random.default_rng([generator.seed, day.toordinal(), inst.exchange_token, 0xB1])
    if rng.integers(_BLOCK_SHARE) != 0:
        return []
    n = int(rng.integers(1, 4))
    px = np.array([round_to_tick(eq_open * (1 + rng.normal(0, 0.004)), inst.tick_size)
                   for _ in range(n)])  # fmt: skip
    # Block deals are at least 10 crore rupees each.
    qty = np.ceil(10e7 / px * (1 + rng.random(n))).astype(np.int64)
    return [
        BhavcopyRow(
            trad_dt=day, biz_dt=day, sgmt="CM", src="NSE", fin_instrm_tp="STK",
            fin_instrm_id=BLOCK_ID_OFFSET + inst.exchange_token, isin=sim_isin(inst),
            tckr_symb=inst.tradingsymbol, scty_srs="BL", xpry_dt=None,
            fininstrm_actl_xpry_dt=None, strk_pric=None, optn_tp=None,
            fin_instrm_nm=inst.name or inst.tradingsymbol, opn_pric=float(px[0]),
            hgh_pric=float(px.max()), lw_pric=float(px.min()), cls_pric=float(px[-1]),
            last_pric=float(px[-1]), prvs_clsg_pric=inst.last_price, undrlyg_pric=None,
            sttlm_pric=float(px[-1]), opn_intrst=None, chng_in_opn_intrst=None,
            ttl_tradg_vol=int(qty.sum()), ttl_trf_val=round(float(np.dot(px, qty)), 2),
            ttl_nb_of_txs_exctd=n, ssn_id="F1", new_brd_lot_qty=1,
        )
    ]  # fmt: skip


def bhavcopy_rows(generator: DayGenerator) -> dict[Segment, list[BhavcopyRow]]:
    """The rows of each segment's file: one per instrument that traded on the generator's
    (session-mode) day, and the cash file's block-deal rows."""
    day = generator.trading_day
    win_ns = int(datetime.combine(day, CLOSE_WINDOW_START, IST).timestamp()) * NS
    out: dict[Segment, list[BhavcopyRow]] = {s: [] for s in SEGMENTS}
    closes: dict[str, float] = {}  # future close by underlying, for the options' UndrlygPric
    insts = sorted(
        generator.instruments.values(), key=lambda i: (i.is_derivative, i.instrument_type != "FUT")
    )
    for inst in insts:
        a = generator.day_arrays(inst.instrument_token)
        if not len(a):
            continue
        px, qty = a.price, a.qty
        tail = a.ts >= win_ns
        last = float(px[-1])
        if tail.any():
            close = round_to_tick(
                float(np.dot(px[tail], qty[tail]) / qty[tail].sum()), inst.tick_size
            )
        else:
            close = last
        fo = inst.is_derivative
        opt = inst.instrument_type in ("CE", "PE")
        if inst.instrument_type == "FUT":
            closes[inst.name] = close
        oi_last = int(a.oi[-1]) if a.oi is not None else 0
        oi_prev = generator.previous_oi(inst.instrument_token) or 0
        shares = int(qty.sum())
        turnover = float(np.dot(px + (inst.strike or 0.0) if opt else px, qty))
        row = BhavcopyRow(
            trad_dt=day, biz_dt=day, sgmt="FO" if fo else "CM", src="NSE",
            fin_instrm_tp=_fin_type(inst), fin_instrm_id=inst.exchange_token,
            isin=None if fo else sim_isin(inst), tckr_symb=inst.underlying,
            scty_srs=None if fo else "EQ", xpry_dt=inst.expiry, fininstrm_actl_xpry_dt=inst.expiry,
            strk_pric=inst.strike if opt else None,
            optn_tp=inst.instrument_type if opt else None,
            fin_instrm_nm=inst.tradingsymbol if fo else (inst.name or inst.tradingsymbol),
            opn_pric=float(px[0]), hgh_pric=float(px.max()), lw_pric=float(px.min()),
            cls_pric=close, last_pric=last, prvs_clsg_pric=inst.last_price,
            undrlyg_pric=closes.get(inst.name) if fo else None, sttlm_pric=close,
            opn_intrst=oi_last if fo else None, chng_in_opn_intrst=oi_last - oi_prev if fo else None,
            # NSE's F&O file counts contracts; the generator trades whole lots.
            ttl_tradg_vol=shares // inst.lot_size if fo else shares,
            ttl_trf_val=round(turnover, 2), ttl_nb_of_txs_exctd=len(a), ssn_id="F1",
            new_brd_lot_qty=inst.lot_size,
        )  # fmt: skip
        out[row.sgmt].append(row)
        if not fo:
            out["CM"] += _block_rows(generator, inst, float(px[0]))
    return out


def bhavcopy_files(generator: DayGenerator) -> dict[Segment, bytes]:
    """The day's two zipped files, by segment (an empty segment is a header-only file)."""
    day = generator.trading_day
    return {s: encode_bhavcopy(rows, s, day) for s, rows in bhavcopy_rows(generator).items()}


def write_bhavcopy(generator: DayGenerator, directory: str | Path) -> list[Path]:
    """Write the day's two files into ``directory`` (created if needed) under NSE's names."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for segment, data in bhavcopy_files(generator).items():
        p = d / bhavcopy_filename(segment, generator.trading_day)
        p.write_bytes(data)
        out.append(p)
    return out
