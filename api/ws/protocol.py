"""The /ws message protocol (DESIGN.md section 7) as msgspec structs, and the server's frames.

Client -> server (one JSON object per WebSocket message)::

    {"op": "subscribe", "instruments": [738561, ...], "since": "2025-01-06T09:15:00+05:30"}
    {"op": "subscribe", "instruments": [738561], "since": "1767000000000-0"}   # ring offset
    {"op": "subscribe", "instruments": [738561], "mode": "conflate"}   # newest tick when behind
    {"op": "unsubscribe", "instruments": [738561]}
    {"op": "ping"}
    {"op": "auth", "key": "..."}

Server -> client. A WebSocket *frame* holds either one JSON object or, when the client is behind
and several messages are queued, a JSON array of objects in order (coalescing saves one frame
and one syscall per message). Messages::

    {"type": "tick", "offset": "1767000000000-0" | null, <LiveTick fields>, "status": "OK"}
    {"type": "synced", "instrument_token": 738561, "offset": "1767000000000-0" | null}
    {"type": "dropped", "count": 12}
    {"type": "conflated", "instrument_token": 738561, "skipped": 40}
    {"type": "error", "code": "bad_message", "message": "..."}
    {"type": "pong"}

``dropped`` (default mode) comes ahead of the ticks that follow a hole of ``count`` evicted live
ticks. ``conflated`` (``"mode":"conflate"``) comes right before the newest tick of an
instrument when the connection fell behind and ``skipped`` older ticks of it were never sent.

``exchange_ts`` of a tick is UTC epoch nanoseconds; prices are rupees. ``offset`` is the tick's
ring offset (the id of its entry in the instrument's ring, ``RedisKeys.ring(token)``); ticks
read from the database during a catch-up older than the ring have none (``null``): resume
those with an ISO-8601 ``since``.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

from nadi.tick import LiveTick

# Instrument tokens are stored as bigint: anything outside 1..2**63-1 is no instrument.
Token = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
Tokens = Annotated[list[Token], msgspec.Meta(min_length=1)]


class Subscribe(msgspec.Struct, tag_field="op", tag="subscribe", forbid_unknown_fields=False):
    instruments: Tokens
    since: str | None = None
    # "conflate": when the connection falls behind, only the newest tick per instrument is
    # kept (and ``conflated`` says how many were skipped); default: the exact stream.
    mode: Literal["stream", "conflate"] = "stream"


class Unsubscribe(msgspec.Struct, tag_field="op", tag="unsubscribe", forbid_unknown_fields=False):
    instruments: Tokens


class Ping(msgspec.Struct, tag_field="op", tag="ping", forbid_unknown_fields=False):
    pass


class Auth(msgspec.Struct, tag_field="op", tag="auth", forbid_unknown_fields=False):
    key: str


ClientMessage = Subscribe | Unsubscribe | Ping | Auth

_client_decoder = msgspec.json.Decoder(ClientMessage)
_OPS = frozenset(t.__struct_config__.tag for t in get_args(ClientMessage))


class ProtocolError(Exception):
    """A client message that cannot be acted on; answered with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_client(data: bytes | str) -> ClientMessage:
    """Parse one client message; raises :class:`ProtocolError` with a stable ``code``:
    ``bad_json`` (not JSON, or nested too deeply to parse), ``bad_message`` (JSON, but not an
    object, or wrong field types or values, e.g. a token that is not in 1..2**63-1),
    ``unknown_op`` (an object without a known ``op``)."""
    try:
        message: ClientMessage = _client_decoder.decode(data)
        return message
    except msgspec.ValidationError as e:
        try:  # the typed decoder stops at the first mismatch: is the rest JSON at all?
            obj = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError):
            raise ProtocolError("bad_json", "not JSON (or nested too deeply)") from None
        op = obj.get("op") if isinstance(obj, dict) else None
        known = isinstance(op, str) and op in _OPS
        code = "unknown_op" if isinstance(obj, dict) and not known else "bad_message"
        raise ProtocolError(code, str(e)) from None
    except msgspec.DecodeError as e:
        raise ProtocolError("bad_json", str(e)) from None
    except RecursionError:
        raise ProtocolError("bad_json", "nested too deeply") from None


# ---- server -> client ----------------------------------------------------------------------


class Synced(msgspec.Struct, tag_field="type", tag="synced"):
    instrument_token: int
    offset: str | None


class Dropped(msgspec.Struct, tag_field="type", tag="dropped"):
    count: int


class Conflated(msgspec.Struct, tag_field="type", tag="conflated"):
    instrument_token: int
    skipped: int


class Error(msgspec.Struct, tag_field="type", tag="error"):
    code: str
    message: str


_encode = msgspec.json.Encoder().encode
PONG = b'{"type":"pong"}'


def synced(token: int, offset: str | None) -> bytes:
    return _encode(Synced(token, offset))


def dropped(count: int) -> bytes:
    return _encode(Dropped(count))


def error(code: str, message: str) -> bytes:
    return _encode(Error(code, message))


def tick_from_payload(offset: str | bytes | None, payload: bytes) -> bytes:
    """A ``tick`` message from a LiveTick JSON object (the ring's ``d`` field) without
    re-encoding it: the ``type`` and ``offset`` members are spliced in front."""
    if offset is None:
        return b'{"type":"tick","offset":null,' + payload[1:]
    if isinstance(offset, str):
        offset = offset.encode()
    return b'{"type":"tick","offset":"' + offset + b'",' + payload[1:]


def tick_from_live(offset: str | None, tick: LiveTick) -> bytes:
    """A ``tick`` message from a decoded LiveTick (live fan-out or database catch-up)."""
    return tick_from_payload(offset, _encode(tick))


def conflated(token: int, skipped: int) -> bytes:
    return _encode(Conflated(token, skipped))


def frame(parts: list[bytes], n: int) -> str:
    """One WebSocket text frame from comma-joinable ``parts`` holding ``n`` messages: a single
    message as is, several as a JSON array."""
    if n == 1:
        return parts[0].decode()
    return "[" + b",".join(parts).decode() + "]"
