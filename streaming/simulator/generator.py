"""Deterministic synthetic ticks for one trading day.

Each instrument's stream is a pure function of ``(seed, trading_day, token)`` and the generator's
parameters (mode, rates, the instrument set, which fixes each instrument's share of the rate).
It is produced in fixed blocks of :data:`BLOCK` ticks; block ``k`` draws its randoms from
``PCG64(SeedSequence([seed, day_ordinal, token, k]))`` and carries the running state (price,
volume, open interest, clock) from block ``k - 1``. So any sequence range can be regenerated
exactly (the recovery server needs that) by replaying block states from cached checkpoints.

Units: prices in rupees (multiples of the tick size), quantities in shares (lots x lot size
for derivatives), timestamps UTC epoch nanoseconds, rates in ticks per second.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

import numpy as np
import numpy.typing as npt

from nadi.calendar import SESSION_SECONDS, is_trading_day, session_bounds_ns
from nadi.instruments import Instrument
from nadi.tick import Tick
from nadi.times import NS, ist_date, ist_midnight_ns

BLOCK = 2048
DEFAULT_DENSITY = 20.0  # session mode: ticks per exchange-second, all instruments together
DEFAULT_RATE = 1000.0  # live mode: ticks per second, all instruments together
Mode = Literal["session", "live"]

# Large caps trade more often than the rest of the index.
_BUSY_STOCKS = frozenset(
    "RELIANCE HDFCBANK ICICIBANK INFY TCS SBIN BHARTIARTL AXISBANK KOTAKBANK LT ITC BAJFINANCE".split()
)
_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]


def activity_weight(inst: Instrument) -> float:
    """Relative trading intensity: index futures and near-ATM options busiest, then large caps."""
    if inst.instrument_type == "FUT":
        return 12.0 if inst.name == "NIFTY" else 8.0
    if inst.instrument_type in ("CE", "PE"):
        spot = 26_000.0 if inst.name == "NIFTY" else inst.last_price
        dist = abs((inst.strike or spot) - spot) / 50.0
        return 0.5 + 5.0 * math.exp(-dist / 4.0)
    return 3.0 if inst.tradingsymbol in _BUSY_STOCKS else 1.0


def daily_vol(inst: Instrument) -> float:
    """Daily volatility of log price (fraction): stocks ~1.8%, index futures ~1%, options ~45%."""
    if inst.instrument_type == "FUT":
        return 0.010
    if inst.instrument_type in ("CE", "PE"):
        return 0.45
    return 0.018


def _intensity_profile() -> tuple[_F64, _F64]:
    """U-shaped intraday activity as (cumulative operational time, session second) grids.

    Intensity f(x), x = fraction of the session: busy open, quiet midday, busy close. Ticks are
    drawn as a unit-rate process in *operational* seconds and mapped to session seconds through
    the inverse of the cumulative intensity, normalised so both span the whole session.
    """
    t = np.arange(SESSION_SECONDS + 1, dtype=np.float64)
    x = t / SESSION_SECONDS
    f = 0.5 + 1.2 * (2 * x - 1) ** 2 + 2.0 * np.exp(-x / 0.04) + 1.0 * np.exp(-(1 - x) / 0.05)
    cum = np.concatenate(([0.0], np.cumsum((f[1:] + f[:-1]) / 2)))
    cum *= SESSION_SECONDS / cum[-1]
    return cum, t


_OP_GRID, _T_GRID = _intensity_profile()


@dataclass(frozen=True, slots=True)
class _Params:
    inst: Instrument
    rate: float  # ticks per (operational) second
    sigma: float  # per-tick stdev of log price
    qty_mu: float  # log of the typical equity trade size (shares)
    oi0_lots: int


@dataclass(frozen=True, slots=True)
class _State:
    """The running state at the start of a block."""

    u: float  # operational seconds elapsed (session mode) / seconds since anchor (live mode)
    logp: float
    volume: int
    oi_walk: int  # signed lots; reported open interest is |oi_walk| * lot_size
    done: bool = False


@dataclass(frozen=True, slots=True)
class Block:
    """Ticks ``seq0 .. seq0 + len(ts) - 1`` of one instrument as arrays (see module units)."""

    token: int
    seq0: int
    ts: _I64
    price: _F64
    qty: _I64
    volume: _I64
    bid: _F64
    ask: _F64
    bid_qty: _I64
    ask_qty: _I64
    oi: _I64 | None
    last: bool  # the instrument's stream ends with this block

    def __len__(self) -> int:
        return len(self.ts)

    def to_ticks(self, exchange: str | None, lo: int = 0, hi: int | None = None) -> list[Tick]:
        """Ticks at array positions ``lo:hi``."""
        s = slice(lo, hi)
        n = len(self.ts[s])
        seqs = range(self.seq0 + lo, self.seq0 + lo + n)
        oi: list[int | None] = self.oi[s].tolist() if self.oi is not None else [None] * n
        tok = self.token
        return [
            Tick(tok, q, t, p, exchange, lq, v, o, b, a, bq, aq)
            for q, t, p, lq, v, o, b, a, bq, aq in zip(
                seqs, self.ts[s].tolist(), self.price[s].tolist(), self.qty[s].tolist(),
                self.volume[s].tolist(), oi, self.bid[s].tolist(), self.ask[s].tolist(),
                self.bid_qty[s].tolist(), self.ask_qty[s].tolist(), strict=True,
            )
        ]  # fmt: skip


class DayGenerator:
    """All instruments' ticks for one trading day, regenerable from the seed.

    Session mode: timestamps across ``trading_day``'s 09:15–15:30 IST session with U-shaped
    intensity; ``density`` ticks per exchange-second over all instruments; the stream ends at
    15:30. Live mode: flat intensity of ``rate`` ticks/s over all instruments from ``anchor_ns``
    (wall clock at start, UTC epoch ns), so a tick emitted at its ``exchange_ts`` is "now";
    the trading day is the IST date of the anchor and the stream ends at the next IST midnight
    (sequences restart each trading day; start a new generator for the next day).
    """

    def __init__(
        self,
        instruments: Sequence[Instrument],
        seed: int,
        trading_day: date | None = None,
        *,
        mode: Mode = "session",
        anchor_ns: int | None = None,
        rate: float = DEFAULT_RATE,
        density: float = DEFAULT_DENSITY,
    ) -> None:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        if not instruments:
            raise ValueError("no instruments")
        self.seed = seed
        self.mode: Mode = mode
        if mode == "live":
            if anchor_ns is None:
                raise ValueError("live mode needs anchor_ns")
            if rate <= 0:
                raise ValueError("live mode needs rate > 0")
            self.anchor_ns = anchor_ns
            self.trading_day = ist_date(anchor_ns)
            if trading_day is not None and trading_day != self.trading_day:
                raise ValueError(f"anchor is on {self.trading_day}, not {trading_day}")
            self.end_ns = ist_midnight_ns(self.trading_day) + 86_400 * NS
            total = rate
        else:
            if trading_day is None:
                raise ValueError("session mode needs trading_day")
            if not is_trading_day(trading_day):
                raise ValueError(f"{trading_day} is not an NSE trading day")
            if density <= 0:
                raise ValueError("density must be > 0")
            self.trading_day = trading_day
            self.anchor_ns, self.end_ns = session_bounds_ns(trading_day)
            total = density
        self.rate = rate
        self.density = density
        self.instruments = {i.instrument_token: i for i in instruments}
        if len(self.instruments) != len(instruments):
            raise ValueError("duplicate instrument tokens")
        weights = {t: activity_weight(i) for t, i in self.instruments.items()}
        wsum = sum(weights.values())
        self._params: dict[int, _Params] = {}
        for t, inst in self.instruments.items():
            r = total * weights[t] / wsum
            sigma = daily_vol(inst) * math.sqrt(1.0 / (r * SESSION_SECONDS))
            px = max(inst.last_price, inst.tick_size)
            oi0 = (
                (150_000 if inst.instrument_type == "FUT" else 40_000) if inst.is_derivative else 0
            )
            self._params[t] = _Params(inst, r, sigma, math.log(max(1.0, 60_000.0 / px)), oi0)
        self._day_ord = self.trading_day.toordinal()
        # Checkpoints: state at the start of block k, per token (state 0 is the day's open).
        self._checkpoints: dict[int, list[_State]] = {}

    # --- block machinery -------------------------------------------------------------------
    def _initial(self, token: int) -> _State:
        p = self._params[token]
        px = max(p.inst.last_price, p.inst.tick_size)
        return _State(u=0.0, logp=math.log(px), volume=0, oi_walk=p.oi0_lots)

    def _state(self, token: int, k: int) -> _State:
        cps = self._checkpoints.setdefault(token, [self._initial(token)])
        while len(cps) <= k:
            prev = cps[-1]
            if prev.done:
                return prev
            _, nxt = self._make_block(token, len(cps) - 1, prev)
            cps.append(nxt)
        return cps[k]

    def block(self, token: int, k: int) -> Block | None:
        """Block ``k`` (ticks ``k*BLOCK+1 ..``) of an instrument, or None past its end."""
        if token not in self._params:
            raise KeyError(token)
        st = self._state(token, k)
        if st.done:
            return None
        blk, nxt = self._make_block(token, k, st)
        cps = self._checkpoints[token]
        if len(cps) == k + 1:
            cps.append(nxt)
        return blk

    def _make_block(self, token: int, k: int, st: _State) -> tuple[Block, _State]:
        p = self._params[token]
        inst = p.inst
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self._day_ord, token, k]))
        )
        n = BLOCK
        # Every draw happens in the same order whatever is kept, so blocks are reproducible.
        du = rng.standard_exponential(n) / p.rate
        z = rng.standard_normal(n)
        if inst.is_derivative:
            qty = (rng.geometric(0.35, n) * inst.lot_size).astype(np.int64)
        else:
            qty = np.maximum(1, np.rint(np.exp(p.qty_mu - 1.5 + 1.1 * rng.standard_normal(n))))
            qty = np.minimum(qty, 500_000).astype(np.int64)
        spread = rng.integers(1, 4, n)
        off = rng.integers(0, spread + 1)
        lots_or_one = inst.lot_size if inst.is_derivative else 1
        bid_qty = (rng.integers(1, 60, n) * lots_or_one * (1 if inst.is_derivative else 25)).astype(
            np.int64
        )
        ask_qty = (rng.integers(1, 60, n) * lots_or_one * (1 if inst.is_derivative else 25)).astype(
            np.int64
        )
        oi_step = rng.integers(-3, 4, n) * (rng.random(n) < 0.3)

        u = st.u + np.cumsum(du)
        if self.mode == "session":
            keep = int(np.searchsorted(u, float(SESSION_SECONDS), side="left"))
            secs = np.interp(u[:keep], _OP_GRID, _T_GRID)
            ts = self.anchor_ns + np.rint(secs * NS).astype(np.int64)
        else:
            ts_all = self.anchor_ns + np.rint(u * NS).astype(np.int64)
            keep = int(np.searchsorted(ts_all, self.end_ns, side="left"))
            ts = ts_all[:keep]
        logp = st.logp + np.cumsum(z * p.sigma)
        tick = inst.tick_size
        pt = np.maximum(1, np.rint(np.exp(logp) / tick)).astype(np.int64)
        bid_t = np.maximum(1, pt - off)
        ask_t = bid_t + spread
        vol = st.volume + np.cumsum(qty)
        oi_walk = st.oi_walk + np.cumsum(oi_step)
        last = keep < n
        nxt = _State(
            u=float(u[-1]), logp=float(logp[-1]), volume=int(vol[-1]),
            oi_walk=int(oi_walk[-1]), done=last,
        )  # fmt: skip
        s = slice(0, keep)
        blk = Block(
            token=token, seq0=k * BLOCK + 1, ts=ts,
            price=np.round(pt[s] * tick, 2), qty=qty[s], volume=vol[s],
            bid=np.round(bid_t[s] * tick, 2), ask=np.round(ask_t[s] * tick, 2),
            bid_qty=bid_qty[s], ask_qty=ask_qty[s],
            oi=(np.abs(oi_walk[s]) * inst.lot_size).astype(np.int64) if inst.is_derivative else None,
            last=last,
        )  # fmt: skip
        return blk, nxt

    # --- public API ------------------------------------------------------------------------
    def previous_oi(self, token: int) -> int | None:
        """Open interest (shares) carried in from the previous day; None for cash."""
        p = self._params[token]
        return p.oi0_lots * p.inst.lot_size if p.inst.is_derivative else None

    def blocks(self, token: int) -> Iterator[Block]:
        """The instrument's blocks in order (live mode: until the end of the day)."""
        k = 0
        while (b := self.block(token, k)) is not None:
            yield b
            if b.last:
                return
            k += 1

    def ticks(self, token: int, from_seq: int, to_seq: int) -> list[Tick]:
        """Exactly the ticks ``from_seq..to_seq`` (inclusive) of ``token``, fewer past the end."""
        if from_seq < 1 or to_seq < from_seq:
            return []
        inst = self.instruments[token]
        out: list[Tick] = []
        for k in range((from_seq - 1) // BLOCK, (to_seq - 1) // BLOCK + 1):
            b = self.block(token, k)
            if b is None:
                break
            lo = max(0, from_seq - b.seq0)
            hi = min(len(b), to_seq - b.seq0 + 1)
            out.extend(b.to_ticks(inst.exchange, lo, hi))
            if b.last:
                break
        return out

    def day_arrays(self, token: int) -> Block:
        """Every tick of the instrument's day in one block (session mode: the whole session)."""
        if self.mode != "session":
            raise ValueError("a live day is never complete")
        bs = list(self.blocks(token))
        cat = np.concatenate
        oi = cat([b.oi for b in bs if b.oi is not None]) if bs and bs[0].oi is not None else None
        return Block(
            token, 1, cat([b.ts for b in bs]), cat([b.price for b in bs]), cat([b.qty for b in bs]),
            cat([b.volume for b in bs]), cat([b.bid for b in bs]), cat([b.ask for b in bs]),
            cat([b.bid_qty for b in bs]), cat([b.ask_qty for b in bs]), oi, True,
        )  # fmt: skip

    def stream(self, until_ns: int | None = None, max_ticks: int | None = None) -> Iterator[Tick]:
        """All instruments merged in ``exchange_ts`` order (ties: token, then sequence).

        Stops before the first tick at or after ``until_ns`` or after ``max_ticks`` ticks.
        Merges a window at a time with numpy (as fast as heapq.merge is per tick, it is not
        fast enough for >100k ticks/s): every block is cut at the earliest end among the
        instruments' current blocks, and the cut pieces are sorted together.
        """
        cur: dict[int, tuple[Block, int]] = {}  # token -> (current block, next position)
        for tok in self.instruments:
            b = self.block(tok, 0)
            if b is not None and len(b):
                cur[tok] = (b, 0)
        n = 0
        while cur:
            open_ends = [int(b.ts[-1]) for b, _ in cur.values() if not b.last]
            horizon = min(open_ends) if open_ends else None
            pieces: list[Tick] = []
            keys: list[_I64] = []
            toks: list[_I64] = []
            for tok, (b, pos) in list(cur.items()):
                end = len(b) if horizon is None else int(np.searchsorted(b.ts, horizon, "right"))
                if end > pos:
                    pieces.extend(b.to_ticks(self.instruments[tok].exchange, pos, end))
                    keys.append(b.ts[pos:end])
                    toks.append(np.full(end - pos, tok, dtype=np.int64))
                if end < len(b):
                    cur[tok] = (b, end)
                elif b.last:
                    del cur[tok]
                else:
                    nb = self.block(tok, b.seq0 // BLOCK + 1)
                    if nb is None or not len(nb):
                        del cur[tok]
                    else:
                        cur[tok] = (nb, 0)
            if not pieces:
                continue
            # lexsort is stable: equal (ts, token) keep sequence order.
            order = np.lexsort((np.concatenate(toks), np.concatenate(keys))).tolist()
            for i in order:
                t = pieces[i]
                if (until_ns is not None and t.exchange_ts >= until_ns) or (
                    max_ticks is not None and n >= max_ticks
                ):
                    return
                n += 1
                yield t
