"""Pure logic: the strict tick codec."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nadi.codec import Reason, Rejected, TickCodec, encode, parse_exchange_ts
from nadi.tick import Tick
from nadi.times import NS, trading_day_ordinal

NOW = 1_795_500_000 * NS
codec = TickCodec()


def _raw(**over: object) -> bytes:
    base: dict[str, object] = {
        "instrument_token": 738561, "sequence_id": 5, "exchange_ts": NOW - NS, "last_price": 2450.35,
    }  # fmt: skip
    base.update(over)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def _reason(value: bytes, key: bytes | None = None) -> Reason:
    with pytest.raises(Rejected) as e:
        codec.decode(value, key, NOW)
    return e.value.reason


def test_valid_tick_decodes_with_unknown_fields_ignored() -> None:
    t = codec.decode(_raw(volume=10, feed="B", extra={"x": 1}), b"738561", NOW)
    assert (t.instrument_token, t.sequence_id, t.exchange_ts, t.volume, t.feed) == (
        738561,
        5,
        NOW - NS,
        10,
        "B",
    )


def test_iso_timestamp_with_offset_is_normalised_to_utc_ns() -> None:
    ts = 1795491900123456000  # 2026-11-24T03:45:00.123456Z
    t = codec.decode(_raw(exchange_ts="2026-11-24T09:15:00.123456+05:30"), None, ts + NS)
    assert t.exchange_ts == parse_exchange_ts("2026-11-24T03:45:00.123456+00:00")
    assert t.exchange_ts == ts


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_raw(instrument_token="738561"), Reason.WRONG_TYPE),
        (_raw(last_price="2450.35"), Reason.WRONG_TYPE),
        (_raw(sequence_id=True), Reason.WRONG_TYPE),
        (_raw(instrument_token=0), Reason.OUT_OF_RANGE),
        (_raw(last_price=-1.0), Reason.OUT_OF_RANGE),
        (_raw(volume=-5), Reason.OUT_OF_RANGE),
        (_raw(last_price=...), Reason.MISSING_FIELD),
        (_raw(exchange_ts=...), Reason.MISSING_FIELD),
        (_raw(exchange="NYSE"), Reason.WRONG_TYPE),
        (
            b'{"instrument_token": 1, "sequence_id": 1, "exchange_ts": 1, "last_price": NaN}',
            Reason.NON_FINITE,
        ),
        (
            b'{"instrument_token": 1, "sequence_id": 1, "exchange_ts": 1, "last_price": 1e999}',
            Reason.NON_FINITE,
        ),
        (
            b'{"instrument_token": 1, "sequence_id": 1, "exchange_ts": 1, "bid": -Infinity}',
            Reason.NON_FINITE,
        ),
        (b"[]", Reason.NOT_OBJECT),
        (b"{", Reason.BAD_JSON),
        (b"\xff\xfe{}", Reason.BAD_ENCODING),
        (_raw(exchange_ts="2026-11-24 10:00"), Reason.BAD_TIMESTAMP),
        (_raw(exchange_ts="yesterday"), Reason.BAD_TIMESTAMP),
        (_raw(exchange_ts=NOW + 301 * NS), Reason.FUTURE_TIMESTAMP),
        (_raw(exchange_ts=NOW - 8 * 86400 * NS), Reason.EXPIRED_TIMESTAMP),
        (_raw(pad="x" * 5000), Reason.TOO_LARGE),
    ],
)
def test_rejections_have_reasons(value: bytes, reason: Reason) -> None:
    assert _reason(value) == reason


def test_key_must_be_the_token() -> None:
    assert _reason(_raw(), b"408065") == Reason.KEY_MISMATCH
    assert codec.decode(_raw(), None, NOW).instrument_token == 738561


def test_size_limit_is_checked_before_parsing() -> None:
    huge = b"{" * 10_000  # would be bad JSON, but the size check comes first
    assert _reason(huge) == Reason.TOO_LARGE


@given(
    token=st.integers(1, 2**40),
    seq=st.integers(0, 2**40),
    offset_us=st.integers(0, 6 * 86400 * 1_000_000),
    price=st.floats(0.01, 1e7, allow_nan=False),
    qty=st.none() | st.integers(0, 10**9),
)
def test_encode_decode_round_trip(
    token: int, seq: int, offset_us: int, price: float, qty: int | None
) -> None:
    t = Tick(
        token,
        seq,
        NOW - offset_us * 1000,
        price,
        "NSE",
        qty,
        None,
        None,
        None,
        None,
        None,
        None,
        "A",
    )
    assert codec.decode(encode(t), str(token).encode(), NOW) == t


def test_trading_day_is_the_ist_date() -> None:
    # 2026-11-24 20:00 UTC is already 2026-11-25 01:30 in Asia/Kolkata.
    late_utc = parse_exchange_ts("2026-11-24T20:00:00+00:00")
    early_utc = parse_exchange_ts("2026-11-24T18:00:00+00:00")
    assert trading_day_ordinal(late_utc) == trading_day_ordinal(early_utc) + 1


def test_decode_speed_is_sane() -> None:
    # Not a benchmark (those are `nadi bench`): a guard against an accidental slow path.
    raw = _raw()
    t0 = time.perf_counter()
    for _ in range(20_000):
        codec.decode(raw, None, NOW)
    assert time.perf_counter() - t0 < 2.0
