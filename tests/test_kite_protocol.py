"""The Kite decoder against the official client's parser (kiteconnect, a test-only dependency).

Packets are built here from the documented layout (https://kite.trade/docs/connect/v3/websocket/),
independently of streaming.feeds.kite.protocol; the same frame bytes go through
``KiteTicker._parse_binary`` (plain Python, no Twisted reactor is started) and through ours,
and every field both decode must agree exactly.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kiteconnect import KiteTicker

from nadi.settings import Settings
from streaming.feeds.kite.cli import build_config
from streaming.feeds.kite.mapping import Sequencer, map_packets, to_tick
from streaming.feeds.kite.protocol import (
    Kind,
    Mode,
    Packet,
    decode_frame,
    decode_text,
    mode_message,
    subscribe_message,
)

# Segments of the official client's EXCHANGE_MAP, each with a different price divisor or role.
SEGMENTS = {"nse": 1, "nfo": 2, "cds": 3, "bse": 4, "bfo": 5, "bcd": 6, "mcx": 7, "indices": 9,
            "nco": 12}  # fmt: skip
U32 = 2**32 - 1


def token_of(exchange_token: int, segment: int) -> int:
    return (exchange_token << 8) | segment


def ltp_packet(token: int, ltp: int) -> bytes:
    return struct.pack(">II", token, ltp)


def index_packet(token: int, ltp: int, high: int, low: int, open_: int, close: int,
                 change: int, ts: int | None = None) -> bytes:  # fmt: skip
    body = struct.pack(">7I", token, ltp, high, low, open_, close, change)
    return body if ts is None else body + struct.pack(">I", ts)


def quote_packet(token: int, ltp: int, lq: int, avg: int, vol: int, buy: int, sell: int,
                 open_: int, high: int, low: int, close: int) -> bytes:  # fmt: skip
    return struct.pack(">11I", token, ltp, lq, avg, vol, buy, sell, open_, high, low, close)


def full_packet(quote: bytes, ltt: int, oi: int, oi_high: int, oi_low: int, ts: int,
                depth: list[tuple[int, int, int]]) -> bytes:  # fmt: skip
    assert len(quote) == 44 and len(depth) == 10
    tail = struct.pack(">5I", ltt, oi, oi_high, oi_low, ts)
    levels = b"".join(struct.pack(">IIH", q, p, o) + b"\x00\x00" for q, p, o in depth)
    return quote + tail + levels


def frame_of(packets: list[bytes]) -> bytes:
    return struct.pack(">H", len(packets)) + b"".join(
        struct.pack(">H", len(p)) + p for p in packets
    )


def random_packet(rng: random.Random, kind: Kind, segment: int, now_s: int) -> bytes:
    token = token_of(rng.randrange(1, 2**24), segment)

    def price() -> int:
        return rng.choice([0, 1, rng.randrange(1, 10**7), rng.randrange(1, U32)])

    def qty() -> int:
        return rng.choice([0, 1, rng.randrange(1, 10**6), U32])

    ts = rng.choice([now_s, now_s - rng.randrange(86_400), 0])
    if kind is Kind.LTP:
        return ltp_packet(token, price())
    if kind in (Kind.INDEX_QUOTE, Kind.INDEX_FULL):
        args = (token, price(), price(), price(), price(), price(), rng.randrange(U32))
        return index_packet(*args, ts=ts if kind is Kind.INDEX_FULL else None)
    quote = quote_packet(token, price(), qty(), price(), qty(), qty(), qty(), price(), price(),
                         price(), price())  # fmt: skip
    if kind is Kind.QUOTE:
        return quote
    depth = [(qty(), price(), rng.randrange(2**16)) for _ in range(10)]
    return full_packet(quote, ts, qty(), qty(), qty(), ts, depth)


_ORACLE = KiteTicker("test-key", "test-token")


def _ts(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds)


def assert_same(ours: Packet, theirs: dict[str, Any]) -> None:
    """Every field the official parser yields, against ours (exact float equality: both divide
    the same integer by the same divisor)."""
    assert theirs["instrument_token"] == ours.instrument_token
    assert theirs["last_price"] == ours.last_price
    assert theirs["tradable"] == ((ours.instrument_token & 0xFF) != SEGMENTS["indices"])
    want_mode = {Kind.LTP: "ltp", Kind.INDEX_QUOTE: "quote", Kind.QUOTE: "quote"}.get(
        ours.kind, "full"
    )
    assert theirs["mode"] == want_mode
    if ours.kind is Kind.LTP:
        assert set(theirs) == {"tradable", "mode", "instrument_token", "last_price"}
        return
    assert theirs["ohlc"] == {"open": ours.open, "high": ours.high, "low": ours.low,
                              "close": ours.close}  # fmt: skip
    if ours.kind in (Kind.INDEX_QUOTE, Kind.INDEX_FULL):
        if ours.kind is Kind.INDEX_FULL:
            assert theirs["exchange_timestamp"] == _ts(ours.exchange_ts_s)
        return
    assert theirs["last_traded_quantity"] == ours.last_qty
    assert theirs["average_traded_price"] == ours.average_price
    assert theirs["volume_traded"] == ours.volume
    assert theirs["total_buy_quantity"] == ours.total_buy_qty
    assert theirs["total_sell_quantity"] == ours.total_sell_qty
    if ours.kind is Kind.QUOTE:
        assert "depth" not in theirs and "oi" not in theirs
        return
    assert theirs["oi"] == ours.oi
    assert theirs["oi_day_high"] == ours.oi_day_high
    assert theirs["oi_day_low"] == ours.oi_day_low
    assert theirs["last_trade_time"] == _ts(ours.last_trade_time_s)
    assert theirs["exchange_timestamp"] == _ts(ours.exchange_ts_s)
    for side, levels in (("buy", ours.bids), ("sell", ours.asks)):
        assert theirs["depth"][side] == [
            {"quantity": lv.quantity, "price": lv.price, "orders": lv.orders} for lv in levels
        ]


PER_KIND_AND_SEGMENT = 40


def test_decoder_agrees_with_the_official_parser_on_every_packet_kind() -> None:
    rng = random.Random(14)
    now_s = 1_764_660_000
    counts: Counter[Kind] = Counter()
    segments: Counter[int] = Counter()
    packets = [
        random_packet(rng, kind, seg, now_s)
        for kind in Kind
        for seg in SEGMENTS.values()
        for _ in range(PER_KIND_AND_SEGMENT)
    ]
    rng.shuffle(packets)
    # Frames of 1 to 60 packets, mixed kinds, as a subscription of mixed modes gets them.
    i = 0
    while i < len(packets):
        chunk = packets[i : i + rng.randrange(1, 61)]
        i += len(chunk)
        frame = frame_of(chunk)
        ours = decode_frame(frame)
        theirs = _ORACLE._parse_binary(frame)
        assert not ours.bad and len(ours.packets) == len(theirs) == len(chunk)
        for o, t in zip(ours.packets, theirs, strict=True):
            assert_same(o, t)
            counts[o.kind] += 1
            segments[o.instrument_token & 0xFF] += 1
    expected = PER_KIND_AND_SEGMENT * len(SEGMENTS)
    assert counts == dict.fromkeys(Kind, expected), counts  # 360 of each of the 5 kinds
    assert set(segments) == set(SEGMENTS.values())


def test_price_divisors_follow_the_segment() -> None:
    raw = 123_456_789
    frame = frame_of([ltp_packet(token_of(7, seg), raw) for seg in SEGMENTS.values()])
    got = {p.instrument_token & 0xFF: p.last_price for p in decode_frame(frame).packets}
    assert got[SEGMENTS["nse"]] == raw / 100
    assert got[SEGMENTS["cds"]] == raw / 10_000_000
    assert got[SEGMENTS["bcd"]] == got[SEGMENTS["nco"]] == raw / 10_000
    assert got[SEGMENTS["mcx"]] == got[SEGMENTS["indices"]] == raw / 100


def test_full_packet_maps_to_the_wire_tick() -> None:
    quote = quote_packet(738561 << 8 | 1, 250_050, 5, 249_900, 1_000_000, 7, 9, 1, 2, 3, 4)
    depth = [(100 + i, 250_000 - i * 5, i) for i in range(5)]
    depth += [(200 + i, 250_100 + i * 5, i) for i in range(5)]
    frame = frame_of([full_packet(quote, 1_764_660_000, 42, 50, 40, 1_764_660_001, depth)])
    (p,) = decode_frame(frame).packets
    t = to_tick(p, 7, 1_764_660_001 * 10**9)
    assert (t.last_price, t.last_qty, t.volume, t.oi) == (2500.5, 5, 1_000_000, 42)
    assert (t.bid, t.bid_qty, t.ask, t.ask_qty) == (2500.0, 100, 2501.0, 200)
    assert (t.exchange, t.feed, t.sequence_id) == ("NSE", "kite", 7)


def test_packets_without_a_timestamp_use_the_receive_time() -> None:
    recv = 1_764_660_123_456_789_000
    frame = frame_of([
        ltp_packet(5633 << 8 | 1, 100),
        quote_packet(5633 << 8 | 1, 100, 1, 1, 1, 1, 1, 1, 1, 1, 1),
        index_packet(256265, 100, 1, 1, 1, 1, 0),
        index_packet(256265, 100, 1, 1, 1, 1, 0, ts=1_764_660_000),
    ])  # fmt: skip
    ticks, keys, skipped = map_packets(decode_frame(frame).packets, recv, Sequencer())
    assert [t.exchange_ts for t in ticks] == [recv, recv, recv, 1_764_660_000 * 10**9]
    # Per instrument and trading day from 1; the index's full packet is on the same IST day.
    assert [t.sequence_id for t in ticks] == [1, 2, 1, 2] and skipped == 0
    assert keys == {(5633 << 8 | 1, 20424), (256265, 20424)}


def test_zero_price_packets_are_skipped_not_numbered() -> None:
    frame = frame_of([ltp_packet(5633 << 8 | 1, 0), ltp_packet(5633 << 8 | 1, 100)])
    ticks, _, skipped = map_packets(decode_frame(frame).packets, 10**18, Sequencer())
    assert skipped == 1 and [t.sequence_id for t in ticks] == [1]


def test_bad_frames_are_reported_with_their_bytes() -> None:
    good = ltp_packet(5633 << 8 | 1, 100)
    assert decode_frame(b"\x00").heartbeat
    assert [b.reason for b in decode_frame(b"").bad] == ["short_frame"]
    # A packet of an unknown length is skipped; the ones around it still decode.
    odd = decode_frame(frame_of([good, b"\x01" * 13, good]))
    assert len(odd.packets) == 2 and [b.reason for b in odd.bad] == ["unknown_length"]
    assert odd.bad[0].data == b"\x01" * 13 and odd.bad[0].offset == 12
    # A count promising more than the frame holds, a length running past its end.
    short = decode_frame(struct.pack(">H", 3) + struct.pack(">H", 8) + good)
    assert len(short.packets) == 1 and [b.reason for b in short.bad] == ["truncated"]
    cut = decode_frame(frame_of([good])[:-3])
    assert not cut.packets and [b.reason for b in cut.bad] == ["truncated"]
    trail = decode_frame(frame_of([good]) + b"junk")
    assert len(trail.packets) == 1 and trail.bad[0].reason == "trailing_bytes"
    assert trail.bad[0].hex() == b"junk".hex()
    assert decode_frame(frame_of([b"\xff" * 500])).bad[0].hex(8).endswith("...(500 bytes)")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    frame = decode_frame(data)
    for p in frame.packets:
        assert p.kind in Kind


def test_text_frames() -> None:
    assert decode_text('{"type":"error","data":"Invalid token"}') is not None
    msg = decode_text('{"type":"order","data":{"order_id":"1"}}')
    assert msg is not None and msg.type == "order"
    assert decode_text("not json") is None and decode_text("[1]") is None
    assert subscribe_message([738561, 5633]) == b'{"a":"subscribe","v":[738561,5633]}'
    assert mode_message(Mode.FULL, [5633]) == b'{"a":"mode","v":["full",[5633]]}'


def test_config_from_settings_and_files(tmp_path: Path) -> None:
    s = Settings().model_copy(
        update={
            "kite_ws_url": "ws://127.0.0.1:1/x?v=3",
            "kite_api_key": "k",
            "kite_access_token": "SECRET",
            "topic_ticks": "ticks.raw.x",
        }
    )
    csv_file = tmp_path / "instruments.csv"
    csv_file.write_text("instrument_token,exchange_token,tradingsymbol\n408065,1594,INFY\n")
    plain = tmp_path / "tokens.txt"
    plain.write_text("# mine\n738561\n\n5633  # again below\n")
    c = build_config(s, "5633,256265", csv_file, Mode.LTP, None)
    assert c.connections == ((5633, 256265, 408065),) and c.mode is Mode.LTP
    assert c.topic == "ticks.raw.x" and "SECRET" not in repr(c)  # kept out of logs
    assert c.url() == "ws://127.0.0.1:1/x?v=3&api_key=k&access_token=SECRET"
    assert build_config(s, "", plain, Mode.FULL, "other").tokens == (738561, 5633)
    with pytest.raises(ValueError, match="not an instrument token"):
        build_config(s, "5633,INFY", None, Mode.FULL, None)
    with pytest.raises(ValueError, match="--tokens, --instruments-file or --symbols"):
        build_config(s, "", None, Mode.FULL, None)
    with pytest.raises(ValueError, match="NADI_KITE_API_KEY"):
        build_config(s.model_copy(update={"kite_access_token": ""}), "1", None, Mode.FULL, None)
