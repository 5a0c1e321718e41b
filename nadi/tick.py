"""The tick: wire format v1 (DESIGN.md section 4) and the validated, normalised form.

Units: prices in rupees (float, already a multiple of the tick size), quantities in shares
(or contracts x lot size, as the exchange reports them), ``exchange_ts_ns`` in nanoseconds since
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


class WireTick(msgspec.Struct, forbid_unknown_fields=False):
    """A tick exactly as it travels on ``ticks.raw`` (JSON). Unknown fields are ignored."""

    instrument_token: PositiveInt
    sequence_id: NonNegInt
    exchange_ts: int | str
    last_price: PositiveFloat
    exchange: Exchange | None = None
    last_qty: NonNegInt | None = None
    volume: NonNegInt | None = None
    oi: NonNegInt | None = None
    bid: PositiveFloat | None = None
    ask: PositiveFloat | None = None
    bid_qty: NonNegInt | None = None
    ask_qty: NonNegInt | None = None
    feed: str | None = None


class Tick(msgspec.Struct, frozen=True, gc=False, rename={"exchange_ts_ns": "exchange_ts"}):
    """A validated tick. ``exchange_ts_ns`` is UTC epoch nanoseconds (encoded as
    ``exchange_ts``, so a Tick's JSON reads like the wire format)."""

    instrument_token: int
    sequence_id: int
    exchange_ts_ns: int
    last_price: float
    exchange: str | None = None
    last_qty: int | None = None
    volume: int | None = None
    oi: int | None = None
    bid: float | None = None
    ask: float | None = None
    bid_qty: int | None = None
    ask_qty: int | None = None
    feed: str | None = None

    @property
    def trading_day_ordinal(self) -> int:
        """Days since 1970-01-01 of the Asia/Kolkata date of ``exchange_ts``."""
        return trading_day_ordinal(self.exchange_ts_ns)

    def payload_fingerprint(self) -> tuple[object, ...]:
        """What must agree between two packets of the same sequence (the feed may differ)."""
        return (
            self.exchange_ts_ns, self.last_price, self.last_qty, self.volume, self.oi,
            self.bid, self.ask, self.bid_qty, self.ask_qty,
        )  # fmt: skip

    def to_wire(self, feed: str | None = None) -> WireTick:
        return WireTick(
            instrument_token=self.instrument_token,
            sequence_id=self.sequence_id,
            exchange_ts=self.exchange_ts_ns,
            last_price=self.last_price,
            exchange=self.exchange,  # type: ignore[arg-type]
            last_qty=self.last_qty,
            volume=self.volume,
            oi=self.oi,
            bid=self.bid,
            ask=self.ask,
            bid_qty=self.bid_qty,
            ask_qty=self.ask_qty,
            feed=feed if feed is not None else self.feed,
        )
