"""The Kite Connect ticker protocol (https://kite.trade/docs/connect/v3/websocket/).

Binary frames from the server: a big-endian uint16 packet count, then per packet a uint16
length and the packet. A 1-byte frame is a heartbeat. Packet layouts by length (all integers
big-endian unsigned 32-bit unless said; prices in the segment's smallest unit, see
:data:`PRICE_DIVISORS`):

- 8 (LTP): token, last price.
- 28 (index quote) / 32 (index full): token, last price, high, low, open, close, change
  (bytes 24-28, not decoded: it is derived), and for 32 the exchange timestamp (28-32, epoch s).
- 44 (quote): token, last price, last quantity, average price, volume, total buy quantity,
  total sell quantity, open, high, low, close.
- 184 (full): the quote fields, then last trade time (44-48, epoch s), OI, OI day high, OI day
  low, exchange timestamp (60-64, epoch s), and the depth at 64-184: ten entries of 12 bytes
  (quantity uint32, price uint32, orders uint16, 2 bytes padding), five bids then five asks.

Text frames from the server are JSON: ``{"type": "error"|"order"|"message", "data": ...}``.
Text frames to the server: ``{"a": "subscribe", "v": [tokens]}``, ``{"a": "mode", "v": [mode,
[tokens]]}``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

import msgspec


class Mode(StrEnum):
    LTP = "ltp"
    QUOTE = "quote"
    FULL = "full"


class Kind(StrEnum):
    """A packet's layout, named by what it is (its length decides)."""

    LTP = "ltp"  # 8 bytes
    INDEX_QUOTE = "index_quote"  # 28
    INDEX_FULL = "index_full"  # 32
    QUOTE = "quote"  # 44
    FULL = "full"  # 184


KIND_BY_LENGTH: dict[int, Kind] = {
    8: Kind.LTP,
    28: Kind.INDEX_QUOTE,
    32: Kind.INDEX_FULL,
    44: Kind.QUOTE,
    184: Kind.FULL,
}

# Segment = token & 0xff (the official client's EXCHANGE_MAP, kiteconnect 5.x ticker.py).
SEGMENT_NSE, SEGMENT_NFO, SEGMENT_CDS, SEGMENT_BSE, SEGMENT_BFO = 1, 2, 3, 4, 5
SEGMENT_BCD, SEGMENT_MCX, SEGMENT_MCXSX, SEGMENT_INDICES, SEGMENT_NCO = 6, 7, 8, 9, 12
# Prices arrive as integers in paise (divide by 100), except NSE currency derivatives (CDS,
# 1e7) and BSE currency and NCO (1e4): the official client's table.
PRICE_DIVISORS: dict[int, float] = {SEGMENT_CDS: 10_000_000.0, SEGMENT_BCD: 10_000.0,
                                    SEGMENT_NCO: 10_000.0}  # fmt: skip
DEFAULT_DIVISOR = 100.0


def price_divisor(token: int) -> float:
    """What a raw price of ``token``'s segment is divided by to give rupees."""
    return PRICE_DIVISORS.get(token & 0xFF, DEFAULT_DIVISOR)


@dataclass(frozen=True, slots=True)
class DepthLevel:
    """One market-depth entry: price in rupees, quantity in units, number of orders."""

    price: float
    quantity: int
    orders: int


@dataclass(frozen=True, slots=True)
class Packet:
    """A decoded packet. Prices in rupees (raw / :func:`price_divisor`), quantities in units as
    the exchange reports them, times in epoch seconds (UTC) as sent, ``None`` where the packet
    kind does not carry the field."""

    kind: Kind
    instrument_token: int
    last_price: float
    high: float | None = None
    low: float | None = None
    open: float | None = None
    close: float | None = None
    last_qty: int | None = None
    average_price: float | None = None
    volume: int | None = None
    total_buy_qty: int | None = None
    total_sell_qty: int | None = None
    last_trade_time_s: int | None = None
    oi: int | None = None
    oi_day_high: int | None = None
    oi_day_low: int | None = None
    exchange_ts_s: int | None = None
    bids: tuple[DepthLevel, ...] = ()
    asks: tuple[DepthLevel, ...] = ()


@dataclass(frozen=True, slots=True)
class BadPacket:
    """Bytes that could not be decoded: why, where in the frame (byte offset), and the bytes."""

    reason: str  # short_frame | truncated | unknown_length | trailing_bytes
    offset: int
    data: bytes

    def hex(self, limit: int = 64) -> str:
        """The bytes as hex, at most ``limit`` of them (then ``...`` and the full length)."""
        h = self.data[:limit].hex()
        return h if len(self.data) <= limit else f"{h}...({len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded binary frame: its packets, and what in it was bad."""

    packets: tuple[Packet, ...]
    bad: tuple[BadPacket, ...] = ()
    heartbeat: bool = False


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_LTP = struct.Struct(">II")
_INDEX = struct.Struct(">IIIIIIi")  # token, ltp, high, low, open, close, change (signed)
_QUOTE = struct.Struct(">11I")
_FULL_TAIL = struct.Struct(">5I")  # last trade time, oi, oi high, oi low, exchange ts
_DEPTH = struct.Struct(">IIH2x")


def decode_packet(packet: bytes) -> Packet | None:
    """One packet, or None if its length is not a known layout."""
    kind = KIND_BY_LENGTH.get(len(packet))
    if kind is None:
        return None
    if kind is Kind.LTP:
        token, ltp = _LTP.unpack(packet)
        return Packet(kind, token, ltp / price_divisor(token))
    if kind is Kind.INDEX_QUOTE or kind is Kind.INDEX_FULL:
        token, ltp, high, low, open_, close, _change = _INDEX.unpack_from(packet)
        d = price_divisor(token)
        ts = _U32.unpack_from(packet, 28)[0] if kind is Kind.INDEX_FULL else None
        return Packet(kind, token, ltp / d, high=high / d, low=low / d, open=open_ / d,
                      close=close / d, exchange_ts_s=ts)  # fmt: skip
    token, ltp, lq, avg, vol, buy, sell, open_, high, low, close = _QUOTE.unpack_from(packet)
    d = price_divisor(token)
    if kind is Kind.QUOTE:
        return Packet(kind, token, ltp / d, high=high / d, low=low / d, open=open_ / d,
                      close=close / d, last_qty=lq, average_price=avg / d, volume=vol,
                      total_buy_qty=buy, total_sell_qty=sell)  # fmt: skip
    ltt, oi, oi_high, oi_low, ts = _FULL_TAIL.unpack_from(packet, 44)
    levels = tuple(
        DepthLevel(price / d, qty, orders)
        for qty, price, orders in (_DEPTH.unpack_from(packet, 64 + 12 * i) for i in range(10))
    )
    return Packet(kind, token, ltp / d, high=high / d, low=low / d, open=open_ / d,
                  close=close / d, last_qty=lq, average_price=avg / d, volume=vol,
                  total_buy_qty=buy, total_sell_qty=sell, last_trade_time_s=ltt, oi=oi,
                  oi_day_high=oi_high, oi_day_low=oi_low, exchange_ts_s=ts,
                  bids=levels[:5], asks=levels[5:])  # fmt: skip


def decode_frame(frame: bytes) -> Frame:
    """A binary frame: never raises. A packet of unknown length is skipped (its length prefix
    still tells where the next one starts); a length running past the frame ends it."""
    n = len(frame)
    if n == 1:
        return Frame((), heartbeat=True)
    if n < 2:
        return Frame((), (BadPacket("short_frame", 0, frame),))
    count = _U16.unpack_from(frame, 0)[0]
    packets: list[Packet] = []
    bad: list[BadPacket] = []
    pos = 2
    for _ in range(count):
        if pos + 2 > n:
            bad.append(BadPacket("truncated", pos, frame[pos:]))
            return Frame(tuple(packets), tuple(bad))
        length = _U16.unpack_from(frame, pos)[0]
        start, end = pos + 2, pos + 2 + length
        if end > n:
            bad.append(BadPacket("truncated", pos, frame[pos:]))
            return Frame(tuple(packets), tuple(bad))
        p = decode_packet(frame[start:end])
        if p is None:
            bad.append(BadPacket("unknown_length", pos, frame[start:end]))
        else:
            packets.append(p)
        pos = end
    if pos < n:
        bad.append(BadPacket("trailing_bytes", pos, frame[pos:]))
    return Frame(tuple(packets), tuple(bad))


class ServerMessage(msgspec.Struct, frozen=True):
    """A text frame from the server: ``type`` is ``error``, ``order`` or ``message``."""

    type: str = "unknown"
    data: object = None


_server_message = msgspec.json.Decoder(ServerMessage)


def decode_text(text: str | bytes) -> ServerMessage | None:
    """A server text frame, or None if it is not a JSON object of that shape."""
    try:
        return _server_message.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


_encode = msgspec.json.Encoder().encode


def subscribe_message(tokens: list[int]) -> bytes:
    """``{"a":"subscribe","v":[tokens]}``."""
    return _encode({"a": "subscribe", "v": tokens})


def mode_message(mode: Mode, tokens: list[int]) -> bytes:
    """``{"a":"mode","v":[mode,[tokens]]}``."""
    return _encode({"a": "mode", "v": [mode.value, tokens]})
