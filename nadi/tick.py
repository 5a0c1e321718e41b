"""The tick: wire format v1 (DESIGN.md section 4) and the validated, normalised form.

Units: prices in rupees (float, already a multiple of the tick size), quantities in shares
(or contracts x lot size, as the exchange reports them), ``exchange_ts`` in nanoseconds since
the Unix epoch, UTC.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import msgspec

from nadi.times import trading_day_ordinal

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Exchange = Literal["NSE", "BSE", "NFO", "BFO", "MCX", "CDS"]


class TickStatus(StrEnum):
    OK = "OK"
    STALE = "STALE"  # the first tick after a gap
    RECOVERED = "RECOVERED"  # a late or repaired tick that filled a gap


class TickFields(msgspec.Struct, frozen=True):
    """The tick's fields, declared once (DESIGN.md section 4). The bounds apply when a message
    is decoded (:class:`WireTick`); constructing a :class:`Tick` or :class:`LiveTick` does not
    check them."""

    instrument_token: PositiveInt
    sequence_id: NonNegInt
    exchange_ts: int  # UTC epoch nanoseconds
    last_price: PositiveFloat
    exchange: str | None = None  # WireTick narrows it to Exchange
    last_qty: NonNegInt | None = None
    volume: NonNegInt | None = None
    oi: NonNegInt | None = None
    bid: PositiveFloat | None = None
    ask: PositiveFloat | None = None
    bid_qty: NonNegInt | None = None
    ask_qty: NonNegInt | None = None
    feed: str | None = None


# The value columns (DESIGN.md section 4 and the ``ticks`` table), after the key fields.
TICK_MEASURES = ("last_price", "last_qty", "volume", "oi", "bid", "ask", "bid_qty", "ask_qty")
# The ``ticks`` table's columns, in table order.
TICK_COLUMNS = (
    "instrument_token", "exchange_ts", "sequence_id", *TICK_MEASURES, "status", "feed",
)  # fmt: skip


class WireTick(TickFields, frozen=True):
    """A tick exactly as it travels on ``ticks.raw`` (JSON). Unknown fields are ignored;
    ``exchange_ts`` may also be ISO-8601 with an offset (normalised by the codec)."""

    exchange_ts: int | str  # type: ignore[assignment]
    exchange: Exchange | None = None


class Tick(TickFields, frozen=True, gc=False):
    """A validated tick. Its JSON is the wire JSON (epoch-ns ``exchange_ts``)."""

    @property
    def trading_day_ordinal(self) -> int:
        """Days since 1970-01-01 of the Asia/Kolkata date of ``exchange_ts``."""
        return trading_day_ordinal(self.exchange_ts)

    def payload_fingerprint(self) -> tuple[object, ...]:
        """What must agree between two packets of the same sequence (the feed may differ)."""
        return (
            self.exchange_ts, self.last_price, self.last_qty, self.volume, self.oi,
            self.bid, self.ask, self.bid_qty, self.ask_qty,
        )  # fmt: skip


class LiveTick(TickFields, frozen=True, omit_defaults=True, kw_only=True):
    """What the ring and the live stream carry for one tick: the tick's fields plus its
    status, last (as :func:`nadi.ring.live_payload` splices it)."""

    status: str


def as_tick(t: TickFields) -> Tick:
    """The :class:`Tick` with the same field values (the same object if it is one)."""
    if type(t) is Tick:
        return t
    return Tick(
        t.instrument_token, t.sequence_id, t.exchange_ts, t.last_price, t.exchange, t.last_qty,
        t.volume, t.oi, t.bid, t.ask, t.bid_qty, t.ask_qty, t.feed,
    )  # fmt: skip
