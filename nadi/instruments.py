"""The instrument master in Kite's instruments-CSV shape: the bundled set, a loader, the DB upsert.

The bundled cash-market rows (the NIFTY 50 stocks, real NSE exchange tokens) live in
``nadi/data/instruments.csv``. Derivatives expire, so their rows are not bundled: they are
generated for a given day by :func:`derivatives_for` (NIFTY and BANKNIFTY current-month futures,
a strip of NIFTY weekly options). Prices are in rupees, ``lot_size`` in shares.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from importlib import resources
from pathlib import Path

import asyncpg
import msgspec

from nadi.calendar import is_trading_day, today_ist

KITE_COLUMNS = (
    "instrument_token", "exchange_token", "tradingsymbol", "name", "last_price", "expiry",
    "strike", "tick_size", "lot_size", "instrument_type", "segment", "exchange",
)  # fmt: skip
_DERIVATIVE_EXCHANGES = frozenset({"NFO", "BFO", "MCX", "CDS", "BCD", "NCO"})
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKLY_MONTH_CODE = "123456789OND"  # Kite's one-letter month in weekly option symbols


class Instrument(msgspec.Struct, frozen=True):
    """One row of the master. Prices in rupees; ``expiry``/``strike`` are None for cash."""

    instrument_token: int
    exchange_token: int
    tradingsymbol: str
    name: str
    last_price: float
    expiry: date | None
    strike: float | None
    tick_size: float
    lot_size: int
    instrument_type: str  # EQ, FUT, CE, PE
    segment: str  # NSE, NFO-FUT, NFO-OPT, INDICES, ...
    exchange: str  # NSE, BSE, NFO, ...

    @property
    def is_derivative(self) -> bool:
        return self.exchange in _DERIVATIVE_EXCHANGES or self.instrument_type in ("FUT", "CE", "PE")

    @property
    def underlying(self) -> str:
        """The underlying's symbol (``name`` for derivatives, the symbol itself for cash)."""
        return self.name if self.is_derivative and self.name else self.tradingsymbol


# Index underlyings of the generated derivatives: spot level (rupees), futures lot size (shares),
# option strike step (points), annualised vol (for the option premiums).
_INDICES: dict[str, tuple[float, int, int, float]] = {
    "NIFTY": (26_000.0, 75, 50, 0.13),
    "BANKNIFTY": (59_000.0, 35, 100, 0.15),
}
OPTION_STRIKES_EACH_SIDE = 10


def nse_tick_size(price: float) -> float:
    """NSE's equity tick size for a price band (2025 revision), rupees."""
    if price < 250:
        return 0.01
    if price < 1000:
        return 0.05
    if price < 5000:
        return 0.10
    if price < 10_000:
        return 0.50
    if price < 20_000:
        return 1.00
    return 5.00


def round_to_tick(price: float, tick: float) -> float:
    """Nearest multiple of ``tick`` (at least one tick), as a 2-decimal float."""
    return round(max(1, round(price / tick)) * tick, 2)


def _adjust_for_holiday(d: date) -> date:
    # An expiry that falls on a holiday moves to the previous trading day (NSE's rule).
    while not is_trading_day(d):
        d -= timedelta(days=1)
    return d


def _last_tuesday(year: int, month: int) -> date:
    nxt = date(year + month // 12, month % 12 + 1, 1)
    d = nxt - timedelta(days=1)
    return d - timedelta(days=(d.weekday() - 1) % 7)


def monthly_expiry(day: date) -> date:
    """The current-month index derivatives expiry on ``day``: last Tuesday (holiday-adjusted)."""
    y, m = day.year, day.month
    for _ in range(2):
        e = _adjust_for_holiday(_last_tuesday(y, m))
        if e >= day:
            return e
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return e


def weekly_expiry(day: date) -> date:
    """The nearest NIFTY weekly expiry on or after ``day``: Tuesday (holiday-adjusted)."""
    tue = day + timedelta(days=(1 - day.weekday()) % 7)
    e = _adjust_for_holiday(tue)
    if e < day:
        e = _adjust_for_holiday(tue + timedelta(days=7))
    return e


def _bs_price(spot: float, strike: float, years: float, vol: float, call: bool) -> float:
    """Black–Scholes premium (zero rates): only a plausible starting price for the simulator."""
    sd = vol * math.sqrt(max(years, 1 / 365))
    d1 = (math.log(spot / strike) + sd * sd / 2) / sd
    d2 = d1 - sd

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    if call:
        return spot * cdf(d1) - strike * cdf(d2)
    return strike * cdf(-d2) - spot * cdf(-d1)


def derivatives_for(day: date) -> list[Instrument]:
    """NFO rows live on ``day``: NIFTY/BANKNIFTY current-month futures and NIFTY weekly options.

    Tokens are Kite-style (``exchange_token * 256 + 2``) with exchange tokens derived from the
    contract (expiry month or week, strike, CE/PE), so a contract keeps its token every day it
    lives and no two contracts of one master share one.
    """
    out: list[Instrument] = []
    fut_expiry = monthly_expiry(day)
    years = ((fut_expiry - day).days + 1) / 365
    for i, (name, (spot, lot, _step, _vol)) in enumerate(_INDICES.items()):
        month_slot = (fut_expiry.year * 12 + fut_expiry.month) % 100
        et = 35_000 + month_slot * 10 + i
        price = spot * (1 + 0.065 * years)  # cost of carry
        sym = f"{name}{fut_expiry:%y}{_MONTHS[fut_expiry.month - 1]}FUT"
        out.append(
            Instrument(et * 256 + 2, et, sym, name, round_to_tick(price, 0.10), fut_expiry,
                       None, 0.10, lot, "FUT", "NFO-FUT", "NFO")
        )  # fmt: skip
    spot, lot, step, vol = _INDICES["NIFTY"]
    wk = weekly_expiry(day)
    years = ((wk - day).days + 1) / 365
    is_monthly = wk == monthly_expiry(wk)
    prefix = (
        f"NIFTY{wk:%y}{_MONTHS[wk.month - 1]}"
        if is_monthly
        else f"NIFTY{wk:%y}{_WEEKLY_MONTH_CODE[wk.month - 1]}{wk.day:02d}"
    )
    atm = round(spot / step) * step
    week_slot = (wk.toordinal() // 7) % 20
    for k in range(-OPTION_STRIKES_EACH_SIDE, OPTION_STRIKES_EACH_SIDE + 1):
        strike = float(atm + k * step)
        for j, opt in enumerate(("CE", "PE")):
            et = 40_000 + week_slot * 1000 + (int(strike) // step % 500) * 2 + j
            prem = _bs_price(spot, strike, years, vol, opt == "CE")
            out.append(
                Instrument(et * 256 + 2, et, f"{prefix}{int(strike)}{opt}", "NIFTY",
                           round_to_tick(prem, 0.05), wk, strike, 0.05, lot, opt, "NFO-OPT", "NFO")
            )  # fmt: skip
    return out


def bundled_equities() -> list[Instrument]:
    """The bundled NSE cash rows (NIFTY 50 stocks)."""
    text = resources.files("nadi").joinpath("data/instruments.csv").read_text("utf-8")
    return load_kite_csv(text)


def bundled_instruments(day: date | None = None) -> list[Instrument]:
    """The simulator's master for ``day`` (default: today in IST): equities, then derivatives."""
    return bundled_equities() + derivatives_for(day or today_ist())


def _opt_float(s: str | None) -> float | None:
    s = (s or "").strip()
    return float(s) if s else None


def load_kite_csv(path_or_text: str | Path) -> list[Instrument]:
    """Parse Kite's instruments CSV (a path, or the text itself when it contains a newline).

    Tolerant of the real file: blank ``expiry``/``strike``/``last_price``, a zero strike for
    non-options (read as None), extra or reordered columns.
    """
    if isinstance(path_or_text, Path) or "\n" not in path_or_text:
        text = Path(path_or_text).read_text("utf-8-sig")
    else:
        text = path_or_text
    out: list[Instrument] = []
    for row in csv.DictReader(io.StringIO(text)):
        expiry = (row.get("expiry") or "").strip()
        strike = _opt_float(row.get("strike"))
        itype = (row.get("instrument_type") or "EQ").strip() or "EQ"
        out.append(
            Instrument(
                instrument_token=int(row["instrument_token"]),
                exchange_token=int(row.get("exchange_token") or 0),
                tradingsymbol=row["tradingsymbol"].strip(),
                name=(row.get("name") or "").strip(),
                last_price=_opt_float(row.get("last_price")) or 0.0,
                expiry=date.fromisoformat(expiry) if expiry else None,
                strike=strike if strike and itype in ("CE", "PE") else None,
                tick_size=_opt_float(row.get("tick_size")) or 0.05,
                lot_size=int(float(row.get("lot_size") or 1)) or 1,
                instrument_type=itype,
                segment=(row.get("segment") or "NSE").strip(),
                exchange=(row.get("exchange") or "NSE").strip(),
            )
        )
    return out


def to_kite_csv(instruments: Iterable[Instrument]) -> str:
    """The instruments as Kite's CSV text (blank expiry, strike 0 for cash)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(KITE_COLUMNS)
    for i in instruments:
        w.writerow([
            i.instrument_token, i.exchange_token, i.tradingsymbol, i.name, f"{i.last_price:.2f}",
            i.expiry.isoformat() if i.expiry else "", f"{i.strike:g}" if i.strike else "0",
            f"{i.tick_size:g}", i.lot_size, i.instrument_type, i.segment, i.exchange,
        ])  # fmt: skip
    return buf.getvalue()


_UPSERT = """
INSERT INTO instruments (instrument_token, exchange_token, tradingsymbol, name, last_price,
                         expiry, strike, tick_size, lot_size, instrument_type, segment, exchange)
SELECT DISTINCT ON (instrument_token) * FROM _instruments_in ORDER BY instrument_token
ON CONFLICT (instrument_token) DO UPDATE SET
    exchange_token = EXCLUDED.exchange_token, tradingsymbol = EXCLUDED.tradingsymbol,
    name = EXCLUDED.name, last_price = EXCLUDED.last_price, expiry = EXCLUDED.expiry,
    strike = EXCLUDED.strike, tick_size = EXCLUDED.tick_size, lot_size = EXCLUDED.lot_size,
    instrument_type = EXCLUDED.instrument_type, segment = EXCLUDED.segment,
    exchange = EXCLUDED.exchange, updated_at = now()
"""


async def upsert_instruments(conn: asyncpg.Connection, instruments: Sequence[Instrument]) -> int:
    """Insert or update the rows (COPY into a temp table, then one upsert); returns the count.

    Kite's full file (~100k rows) goes through COPY, so one call is fast; a token repeated in
    the input keeps one row.
    """
    records = [
        (i.instrument_token, i.exchange_token, i.tradingsymbol, i.name, i.last_price, i.expiry,
         i.strike, i.tick_size, i.lot_size, i.instrument_type, i.segment, i.exchange)
        for i in instruments
    ]  # fmt: skip
    if not records:
        return 0
    async with conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE _instruments_in ON COMMIT DROP AS"
            " SELECT instrument_token, exchange_token, tradingsymbol, name, last_price, expiry,"
            " strike, tick_size, lot_size, instrument_type, segment, exchange"
            " FROM instruments WITH NO DATA"
        )
        await conn.copy_records_to_table("_instruments_in", records=records, columns=KITE_COLUMNS)
        status = await conn.execute(_UPSERT)
    return int(status.rsplit(" ", 1)[1])
