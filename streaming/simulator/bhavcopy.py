"""End-of-day bhavcopy of a simulated session day, in NSE's UDiFF common bhavcopy CSV format.

Computed from every tick the generator produced for the day, the ones the feed dropped
included: the exchange's file reflects all trades. Close (``ClsPric``) is the volume-weighted
average price of the trades between 15:00 and 15:30 IST rounded to the tick size (NSE's
closing-price rule, simplified), or the last price when there were none. One combined file
holds the cash (``Sgmt=CM``) and F&O (``Sgmt=FO``) rows; NSE publishes them separately.
Prices in rupees, volumes in shares, turnover in rupees.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, time
from pathlib import Path

import numpy as np

from nadi import recovery
from nadi.instruments import Instrument, round_to_tick
from nadi.times import IST, NS
from streaming.simulator.generator import DayGenerator

COLUMNS = (
    "TradDt", "BizDt", "Sgmt", "Src", "FinInstrmTp", "FinInstrmId", "ISIN", "TckrSymb",
    "SctySrs", "XpryDt", "FininstrmActlXpryDt", "StrkPric", "OptnTp", "FinInstrmNm", "OpnPric",
    "HghPric", "LwPric", "ClsPric", "LastPric", "PrvsClsgPric", "UndrlygPric", "SttlmPric",
    "OpnIntrst", "ChngInOpnIntrst", "TtlTradgVol", "TtlTrfVal", "TtlNbOfTxsExctd", "SsnId",
    "NewBrdLotQty", "Rmks", "Rsvd1", "Rsvd2", "Rsvd3", "Rsvd4",
)  # fmt: skip
CLOSE_WINDOW_START = time(15, 0)


def bhavcopy_filename(generator: DayGenerator) -> str:
    """NSE's name for the generator's day's file."""
    return recovery.bhavcopy_filename(generator.trading_day)


def _fin_type(inst: Instrument) -> str:
    if inst.instrument_type == "FUT":
        return "IDF"  # the generated futures are all on indices
    if inst.instrument_type in ("CE", "PE"):
        return "IDO"
    return "STK"


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def bhavcopy_rows(generator: DayGenerator) -> list[dict[str, str]]:
    """One row per instrument that traded on the generator's (session-mode) day."""
    day = generator.trading_day
    win_ns = int(datetime.combine(day, CLOSE_WINDOW_START, IST).timestamp()) * NS
    rows: list[dict[str, str]] = []
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
            vwap = float(np.dot(px[tail], qty[tail]) / qty[tail].sum())
            close = round_to_tick(vwap, inst.tick_size)
        else:
            close = last
        deriv = inst.is_derivative
        if inst.instrument_type == "FUT":
            closes[inst.name] = close
        oi_last = int(a.oi[-1]) if a.oi is not None else 0
        oi_prev = generator.previous_oi(inst.instrument_token) or 0
        rows.append({
            "TradDt": day.isoformat(), "BizDt": day.isoformat(),
            "Sgmt": "FO" if deriv else "CM", "Src": "NSE",
            "FinInstrmTp": _fin_type(inst), "FinInstrmId": str(inst.exchange_token), "ISIN": "",
            "TckrSymb": inst.underlying, "SctySrs": "" if deriv else "EQ",
            "XpryDt": inst.expiry.isoformat() if inst.expiry else "",
            "FininstrmActlXpryDt": inst.expiry.isoformat() if inst.expiry else "",
            "StrkPric": f"{inst.strike:g}" if inst.strike else "",
            "OptnTp": inst.instrument_type if inst.instrument_type in ("CE", "PE") else "",
            "FinInstrmNm": inst.tradingsymbol,
            "OpnPric": _fmt(float(px[0])), "HghPric": _fmt(float(px.max())),
            "LwPric": _fmt(float(px.min())), "ClsPric": _fmt(close), "LastPric": _fmt(last),
            "PrvsClsgPric": _fmt(inst.last_price),
            "UndrlygPric": _fmt(closes[inst.name]) if deriv and inst.name in closes else "",
            "SttlmPric": _fmt(close),
            "OpnIntrst": str(oi_last) if deriv else "",
            "ChngInOpnIntrst": str(oi_last - oi_prev) if deriv else "",
            "TtlTradgVol": str(int(qty.sum())),
            "TtlTrfVal": _fmt(float(np.dot(px, qty))),
            "TtlNbOfTxsExctd": str(len(a)),
            "SsnId": "F1", "NewBrdLotQty": str(inst.lot_size),
            "Rmks": "", "Rsvd1": "", "Rsvd2": "", "Rsvd3": "", "Rsvd4": "",
        })  # fmt: skip
    return rows


def bhavcopy_csv(generator: DayGenerator) -> str:
    """The day's bhavcopy as CSV text (header + rows)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(bhavcopy_rows(generator))
    return buf.getvalue()


def write_bhavcopy(generator: DayGenerator, path: str | Path) -> Path:
    """Write the bhavcopy; ``path`` is a directory (created if needed; NSE's file name is used)
    or a ``.csv`` file path. Returns the file written."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() != ".csv":
        p = p / bhavcopy_filename(generator)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(bhavcopy_csv(generator), "utf-8")
    return p
