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
from enum import StrEnum

import msgspec

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
            reason = Reason.BAD_ENCODING if not _is_utf8(value) else _classify(str(e))
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


def _classify(msg: str) -> Reason:
    if msg.startswith("Number out of range"):
        return Reason.NON_FINITE  # 1e999 and friends overflow to infinity
    if "missing required field" in msg:
        return Reason.MISSING_FIELD
    if msg.startswith("Expected `object`"):
        return Reason.NOT_OBJECT
    if any(op in msg for op in (">= ", "> ", "<= ", "< ")):
        return Reason.OUT_OF_RANGE
    return Reason.WRONG_TYPE


def encode(tick: TickFields, feed: str | None = None) -> bytes:
    """The wire JSON of a tick (epoch-ns timestamp): a Tick's JSON is the wire JSON, so a
    LiveTick or WireTick is first made a Tick (dropping ``status``)."""
    t = as_tick(tick)
    return _encode(t if feed is None else msgspec.structs.replace(t, feed=feed))
