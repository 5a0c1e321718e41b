"""Decode and validate ``ticks.raw`` messages; every rejection carries a reason code.

Strict: no string-to-number coercion, NaN and infinities rejected, ``exchange_ts`` as epoch
nanoseconds or ISO-8601 with an explicit offset (normalised to UTC ns), and the size limit is
checked before any parsing. Bounds on the timestamp come from the caller (settings).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import cast

import msgspec
import msgspec.inspect as mi

from nadi.tick import Tick, TickFields, WireTick, as_tick
from nadi.times import NS, to_epoch_ns


class Reason(StrEnum):
    """Why a message went to the dead-letter topic (the ``reason`` header)."""

    TOO_LARGE = "too_large"
    BAD_ENCODING = "bad_encoding"  # not UTF-8
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"  # a number outside its bounds (token <= 0, price <= 0, ...)
    NON_FINITE = "non_finite"  # NaN or an infinity
    BAD_TIMESTAMP = "bad_timestamp"  # unparseable, or ISO-8601 without an offset
    FUTURE_TIMESTAMP = "future_timestamp"  # more than max_future_skew ahead of now
    EXPIRED_TIMESTAMP = "expired_timestamp"  # older than max_tick_age
    KEY_MISMATCH = "key_mismatch"  # Kafka key is not the instrument token


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_decoder = msgspec.json.Decoder(WireTick, strict=True)
_encode = msgspec.json.Encoder().encode
_NON_FINITE_LITERAL = re.compile(rb":\s*-?(?:NaN|Infinity)\b")
_FLOAT_FIELDS = ("last_price", "bid", "ask")


@dataclass(frozen=True, slots=True)
class TickCodec:
    """Validates raw bytes into :class:`Tick`. Bounds are in seconds relative to ``now``."""

    max_bytes: int = 4096
    max_future_skew_s: float = 300.0
    max_age_s: float = 7 * 86_400.0

    def decode(
        self, value: bytes | None, key: bytes | None = None, now_ns: int | None = None
    ) -> Tick:
        """Return the tick or raise :class:`Rejected` with its reason."""
        if value is None:
            raise Rejected(Reason.BAD_JSON, "empty message (null value)")
        if len(value) > self.max_bytes:
            raise Rejected(Reason.TOO_LARGE, f"{len(value)} bytes > limit {self.max_bytes}")
        try:
            w = _decoder.decode(value)
        except msgspec.ValidationError as e:
            reason = Reason.BAD_ENCODING if not _is_utf8(value) else _reason(value)
            raise Rejected(reason, str(e)) from None
        except msgspec.DecodeError as e:
            raise Rejected(_classify_malformed(value), str(e)) from None
        except UnicodeDecodeError as e:  # invalid UTF-8 inside a known string field
            raise Rejected(Reason.BAD_ENCODING, str(e)) from None
        for name in _FLOAT_FIELDS:
            v = getattr(w, name)
            if v is not None and not math.isfinite(v):
                raise Rejected(Reason.NON_FINITE, f"{name} is {v}")
        ts = w.exchange_ts
        ts_ns = ts if type(ts) is int and ts > 0 else parse_exchange_ts(ts)
        now = time.time_ns() if now_ns is None else now_ns
        if ts_ns > now + int(self.max_future_skew_s * NS):
            raise Rejected(
                Reason.FUTURE_TIMESTAMP, f"exchange_ts {(ts_ns - now) / NS:.1f}s ahead of now"
            )
        if ts_ns < now - int(self.max_age_s * NS):
            raise Rejected(Reason.EXPIRED_TIMESTAMP, f"exchange_ts {(now - ts_ns) / NS:.0f}s old")
        if key is not None and key != str(w.instrument_token).encode():
            raise Rejected(Reason.KEY_MISMATCH, f"key {key[:32]!r} != token {w.instrument_token}")
        bid, ask = w.bid, w.ask
        # Positional: this runs once per tick on the processor's hot path.
        return Tick(
            w.instrument_token,
            w.sequence_id,
            ts_ns,
            float(w.last_price),
            w.exchange,
            w.last_qty,
            w.volume,
            w.oi,
            None if bid is None else float(bid),
            None if ask is None else float(ask),
            w.bid_qty,
            w.ask_qty,
            w.feed,
        )


def parse_exchange_ts(v: int | str) -> int:
    """Epoch ns (int) or ISO-8601 with an explicit offset (str) -> UTC epoch ns."""
    if isinstance(v, int):
        if v <= 0:
            raise Rejected(Reason.OUT_OF_RANGE, "exchange_ts must be positive epoch nanoseconds")
        return v
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise Rejected(Reason.BAD_TIMESTAMP, f"exchange_ts {v[:40]!r} is not ISO-8601") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise Rejected(Reason.BAD_TIMESTAMP, f"exchange_ts {v[:40]!r} has no UTC offset")
    ns = to_epoch_ns(dt)
    if ns <= 0:
        raise Rejected(Reason.OUT_OF_RANGE, "exchange_ts is before 1970")
    return ns


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _classify_malformed(value: bytes) -> Reason:
    if not _is_utf8(value):
        return Reason.BAD_ENCODING
    # Python's json.dumps writes NaN/Infinity literals, which are not JSON: name the real fault.
    if _NON_FINITE_LITERAL.search(value):
        return Reason.NON_FINITE
    return Reason.BAD_JSON


# Why a message that is valid JSON failed the typed decoder, found by checking the fields
# against WireTick's own declaration (msgspec.inspect), not by reading msgspec's message text.
_FIELDS = {
    f.name: (f.type.types if isinstance(f.type, mi.UnionType) else (f.type,))
    for f in mi.type_info(WireTick).fields  # type: ignore[attr-defined]
}
_REQUIRED = tuple(f.name for f in mi.type_info(WireTick).fields if f.required)  # type: ignore[attr-defined]
# Floats as Decimal: a literal like 1e999 decodes here (it overflows a float, so msgspec rejects it).
_loose = msgspec.json.Decoder(float_hook=Decimal).decode


def _reason(value: bytes) -> Reason:
    """The reason for a ValidationError. Known fields are checked in document order, as msgspec
    does, and the first that fails decides; missing fields count only after that."""
    try:
        obj = _loose(value)
    except msgspec.DecodeError:
        return Reason.BAD_JSON  # the typed decoder stopped at a bad field before the bad syntax
    if not isinstance(obj, dict):
        return Reason.NOT_OBJECT
    for name, v in obj.items():
        types = _FIELDS.get(name)
        if types is not None and (reason := _check(v, types)) is not None:
            return reason
    if any(name not in obj for name in _REQUIRED):
        return Reason.MISSING_FIELD
    return Reason.WRONG_TYPE  # not reached for a message msgspec rejected; the safe default


def _check(v: object, types: tuple[mi.Type, ...]) -> Reason | None:
    """None if ``v`` is a valid value of one of ``types``, else the reason it is not."""
    if isinstance(v, Decimal) and not math.isfinite(float(v)):
        return Reason.NON_FINITE  # 1e999 and friends, whatever the field
    is_int = isinstance(v, int) and not isinstance(v, bool)
    for t in types:
        if isinstance(t, mi.NoneType) and v is None:
            return None
        if isinstance(t, mi.IntType) and is_int:
            return _bounds(cast(int, v), t)
        if isinstance(t, mi.FloatType) and (is_int or isinstance(v, Decimal)):
            try:
                return _bounds(float(cast(int | Decimal, v)), t)
            except OverflowError:  # an integer literal beyond float range
                return Reason.NON_FINITE
        if isinstance(t, mi.StrType) and isinstance(v, str):
            return None
        if isinstance(t, mi.LiteralType) and isinstance(v, str) and v in t.values:
            return None
    if is_int and _beyond_float(cast(int, v)):
        return Reason.NON_FINITE  # a field without an int type parses the number as a float
    return Reason.WRONG_TYPE


def _bounds(x: float, t: mi.IntType | mi.FloatType) -> Reason | None:
    if (
        (t.gt is not None and not x > t.gt)
        or (t.ge is not None and not x >= t.ge)
        or (t.lt is not None and not x < t.lt)
        or (t.le is not None and not x <= t.le)
    ):
        return Reason.OUT_OF_RANGE
    return None


def _beyond_float(v: int) -> bool:
    try:
        float(v)
    except OverflowError:
        return True
    return False


def encode(tick: TickFields, feed: str | None = None) -> bytes:
    """The wire JSON of a tick (epoch-ns timestamp): a Tick's JSON is the wire JSON, so a
    LiveTick or WireTick is first made a Tick (dropping ``status``)."""
    t = as_tick(tick)
    return _encode(t if feed is None else msgspec.structs.replace(t, feed=feed))
