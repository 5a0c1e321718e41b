"""A decoded Kite packet to a v1 tick (DESIGN.md section 4), and the sequence numbers.

Kite sends no sequence numbers: :class:`Sequencer` numbers what this adapter receives, per
instrument and trading day (the Asia/Kolkata date of the tick's ``exchange_ts``), from 1.
Timestamps: full packets (184 bytes) and index full packets (32) carry the exchange
timestamp (whole seconds); LTP (8), quote (44) and index quote (28) packets carry none, and
their ``exchange_ts`` is the adapter's receive time (``time.time_ns()`` when the frame
arrived), as is a full packet's whose exchange timestamp is 0.
"""

from __future__ import annotations

from nadi.tick import Tick
from nadi.times import NS, trading_day_ordinal
from streaming.feeds.kite.config import FEED_NAME
from streaming.feeds.kite.protocol import (
    SEGMENT_BFO,
    SEGMENT_BSE,
    SEGMENT_CDS,
    SEGMENT_MCX,
    SEGMENT_NFO,
    SEGMENT_NSE,
    Packet,
)

# Segment -> the wire format's exchange. Indices, BSE currency, MCX-SX and NCO have no
# exchange in the v1 enum: left out (the field is optional; the instrument master has it).
EXCHANGE_BY_SEGMENT: dict[int, str] = {
    SEGMENT_NSE: "NSE", SEGMENT_NFO: "NFO", SEGMENT_CDS: "CDS", SEGMENT_BSE: "BSE",
    SEGMENT_BFO: "BFO", SEGMENT_MCX: "MCX",
}  # fmt: skip

DayKey = tuple[int, int]  # (instrument_token, trading-day ordinal)


def exchange_ts_ns(p: Packet, received_ns: int) -> int:
    """The tick's time, UTC epoch ns: the exchange's where the packet has one, else receipt."""
    return p.exchange_ts_s * NS if p.exchange_ts_s else received_ns


class Sequencer:
    """Per (instrument, trading day) counters. ``last`` is where a restart continues: the
    highest number handed out before (from :mod:`streaming.feeds.kite.state`)."""

    def __init__(self, last: dict[DayKey, int] | None = None) -> None:
        self._last: dict[DayKey, int] = dict(last or {})

    def next(self, token: int, day: int) -> int:
        seq = self._last.get((token, day), 0) + 1
        self._last[(token, day)] = seq
        return seq

    def last(self, key: DayKey) -> int:
        return self._last.get(key, 0)


def to_tick(p: Packet, sequence_id: int, ts_ns: int) -> Tick:
    """The v1 tick of a packet. Full packets give the best bid and ask (depth level 1) when
    the level has a price; quote packets have no depth, so no bid or ask."""
    bid = p.bids[0] if p.bids and p.bids[0].price > 0 else None
    ask = p.asks[0] if p.asks and p.asks[0].price > 0 else None
    return Tick(
        p.instrument_token,
        sequence_id,
        ts_ns,
        p.last_price,
        EXCHANGE_BY_SEGMENT.get(p.instrument_token & 0xFF),
        p.last_qty,
        p.volume,
        p.oi,
        None if bid is None else bid.price,
        None if ask is None else ask.price,
        None if bid is None else bid.quantity,
        None if ask is None else ask.quantity,
        FEED_NAME,
    )


def map_packets(
    packets: tuple[Packet, ...], received_ns: int, sequencer: Sequencer
) -> tuple[list[Tick], set[DayKey], int]:
    """Ticks for a frame's packets in order, the (token, day) keys whose counters moved, and
    how many packets were skipped for having no price (the wire format needs one > 0; Kite
    sends 0 before an instrument's first trade)."""
    ticks: list[Tick] = []
    keys: set[DayKey] = set()
    skipped = 0
    for p in packets:
        if not p.last_price > 0:
            skipped += 1
            continue
        ts = exchange_ts_ns(p, received_ns)
        day = trading_day_ordinal(ts)
        ticks.append(to_tick(p, sequencer.next(p.instrument_token, day), ts))
        keys.add((p.instrument_token, day))
    return ticks, keys, skipped
