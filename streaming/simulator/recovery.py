"""The simulator's retransmission (recovery) server (the client is :mod:`nadi.recovery`).

Like an exchange's recovery server: ask for a sequence range of one instrument on one trading
day and get those ticks again. The server regenerates them from the seed, so they are exactly
what the feed sent (same ``exchange_ts``, prices, quantities; ``feed`` is null). Session days
are pure functions of (seed, instrument set, density); live days need the running simulator's
anchor and rate, so ``nadi simulate`` registers its live generators with the app it serves.

``GET /v1/retransmit?instrument_token=&trading_day=YYYY-MM-DD&from_seq=&to_seq=`` -> NDJSON
``GET /v1/bhavcopy/BhavCopy_NSE_{CM,FO}_0_0_0_YYYYMMDD_F_0000.csv.zip`` -> a session day's
zipped UDiFF bhavcopy files (the URL template ``NADI_BHAVCOPY_URL`` defaults to this)
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import date, datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from nadi.bhavcopy import Segment
from nadi.calendar import is_trading_day
from nadi.codec import encode
from nadi.instruments import Instrument, bundled_instruments
from nadi.recovery import MAX_RANGE
from streaming.simulator.bhavcopy import bhavcopy_files
from streaming.simulator.generator import DEFAULT_DENSITY, DayGenerator

_BHAVCOPY_NAME = re.compile(
    r"BhavCopy_NSE_(?P<segment>CM|FO)_0_0_0_(?P<day>\d{8})_F_0000\.csv\.zip"
)
InstrumentSource = Sequence[Instrument] | Callable[[date], Sequence[Instrument]]


class GeneratorRegistry:
    """Day -> generator: registered live days first, else a (cached) session-mode generator."""

    def __init__(
        self, seed: int, instruments: InstrumentSource | None = None, *,
        density: float = DEFAULT_DENSITY, cache_days: int = 4,
    ) -> None:  # fmt: skip
        self.seed = seed
        self._instruments = instruments
        self.density = density
        self._live: dict[date, DayGenerator] = {}
        self._session: OrderedDict[date, DayGenerator] = OrderedDict()
        self._cache_days = cache_days
        self._lock = threading.Lock()  # the simulate process registers from another thread

    def instruments_for(self, day: date) -> Sequence[Instrument]:
        src = self._instruments
        if src is None:
            return bundled_instruments(day)
        return src(day) if callable(src) else src

    def register(self, gen: DayGenerator) -> None:
        """Serve ``gen``'s day from ``gen`` (live mode, or a session generator built elsewhere)."""
        with self._lock:
            self._live[gen.trading_day] = gen

    def get(self, day: date) -> DayGenerator | None:
        with self._lock:
            if day in self._live:
                return self._live[day]
            if day in self._session:
                self._session.move_to_end(day)
                return self._session[day]
        if not is_trading_day(day):
            return None
        gen = DayGenerator(self.instruments_for(day), self.seed, day, density=self.density)
        with self._lock:
            self._session[day] = gen
            while len(self._session) > self._cache_days:
                self._session.popitem(last=False)
        return gen


def _bad(msg: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def _int_param(q: dict[str, str], name: str, minimum: int) -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        raise ValueError(f"{name} is required")
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}")
    return v


def _day_param(q: dict[str, str]) -> date:
    raw = q.get("trading_day")
    if not raw:
        raise ValueError("trading_day is required (YYYY-MM-DD)")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"trading_day must be YYYY-MM-DD, got {raw[:40]!r}") from None


def create_recovery_app(
    seed: int,
    instruments: InstrumentSource | None = None,
    *,
    density: float = DEFAULT_DENSITY,
    max_range: int = MAX_RANGE,
    registry: GeneratorRegistry | None = None,
) -> FastAPI:
    """The recovery app. ``instruments``: the simulator's master (a list, or day -> list;
    default the bundled master of each day). ``app.state.registry`` takes live generators."""
    reg = registry or GeneratorRegistry(seed, instruments, density=density)
    app = FastAPI(title="Nadi simulator recovery server", version="1")
    app.state.registry = reg

    @app.get("/v1/retransmit")
    def retransmit(request: Request) -> Response:
        """Ticks ``from_seq..to_seq`` (inclusive) of one instrument and day, NDJSON."""
        q = dict(request.query_params)
        try:
            token = _int_param(q, "instrument_token", 1)
            day = _day_param(q)
            lo = _int_param(q, "from_seq", 1)
            hi = _int_param(q, "to_seq", 1)
            if hi < lo:
                raise ValueError("to_seq must be >= from_seq")
            if hi - lo + 1 > max_range:
                raise ValueError(f"range of {hi - lo + 1} sequences exceeds the cap of {max_range}")
        except ValueError as e:
            return _bad(str(e))
        gen = reg.get(day)
        if gen is None:
            return _bad(f"no feed on {day}: not a trading day", 404)
        if token not in gen.instruments:
            return _bad(f"unknown instrument_token {token} on {day}", 404)
        ticks = gen.ticks(token, lo, hi)
        if gen.mode == "live":  # what has not been sent yet cannot be retransmitted
            now = time.time_ns()
            ticks = [t for t in ticks if t.exchange_ts <= now]
        body = b"".join(encode(t) + b"\n" for t in ticks)
        return Response(body, media_type="application/x-ndjson")

    files: OrderedDict[date, dict[Segment, bytes]] = OrderedDict()
    files_lock = threading.Lock()

    @app.get("/v1/bhavcopy/{filename}")
    def bhavcopy(filename: str) -> Response:
        """A session day's zipped UDiFF bhavcopy by NSE's file name (like NSE's archive):
        ``BhavCopy_NSE_CM_0_0_0_YYYYMMDD_F_0000.csv.zip`` or the ``FO`` one. Live days are
        never complete: 404."""
        m = _BHAVCOPY_NAME.fullmatch(filename)
        if m is None:
            return _bad(f"not a UDiFF bhavcopy file name: {filename[:80]!r}", 404)
        segment: Segment = "CM" if m["segment"] == "CM" else "FO"
        try:
            day = datetime.strptime(m["day"], "%Y%m%d").date()
        except ValueError:
            return _bad(f"no such day: {m['day']}", 404)
        with files_lock:
            got = files.get(day)
        if got is None:
            gen = reg.get(day)
            if gen is None or gen.mode != "session":
                return _bad(f"no complete session for {day}", 404)
            got = bhavcopy_files(gen)
            with files_lock:
                files[day] = got
                while len(files) > 4:
                    files.popitem(last=False)
        return Response(
            got[segment],
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
