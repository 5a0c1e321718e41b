"""Query parameters shared by the routes: times with an explicit offset, ranges, cursors, and
the instrument existence check behind the 404s.

Times are accepted only as ISO-8601 with an explicit offset (``Z`` or ``±HH:MM``): a naive time
is ambiguous between UTC and IST, and guessing wrong shifts data by 5 h 30 min silently.
Responses give times in Asia/Kolkata (``+05:30``, no DST).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Query, status
from pydantic import Field

from api.rest.models import ErrorOut
from nadi.times import EPOCH, to_datetime_us, to_epoch_us

IST = timezone(timedelta(hours=5, minutes=30), "IST")

# An unescaped '+' in a query string arrives as a space ("09:15:00 05:30"): restore it rather
# than reject the most common way people type an IST time into a URL.
_SPACE_OFFSET = re.compile(r"^(.*\d)\s(\d{2}:?\d{2})$")
# RFC 3339 / ISO-8601 extended: date, 'T' (or 't' or a space), hh:mm[:ss[.fraction]], offset.
_ISO = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d{1,12}))?"
    r"\s*([Zz]|[+-]\d{2}(?::?\d{2})?)?"
)

TIME_EXAMPLE = "2025-01-06T09:15:00+05:30"
# Times the API accepts, UTC: wide enough for any market history, narrow enough that grid
# arithmetic (a day either side) never leaves datetime's or PostgreSQL's range.
MIN_TIME = EPOCH
MAX_TIME = datetime(2100, 1, 1, tzinfo=UTC)
INT64_MAX = 2**63 - 1  # bigint: instrument tokens, sequence ids


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def parse_time(name: str, value: str) -> datetime:
    """ISO-8601 with an explicit offset -> aware UTC datetime in ``[MIN_TIME, MAX_TIME)``;
    422 with the reason otherwise. Fractions beyond microseconds are truncated (the database
    keeps microseconds)."""
    text = value.strip()
    m = _SPACE_OFFSET.match(text)
    if m:
        text = f"{m.group(1)}+{m.group(2)}"
    m = _ISO.fullmatch(text)
    if m is None:
        raise _unprocessable(f"{name}: {value!r} is not an ISO-8601 time (e.g. {TIME_EXAMPLE})")
    day, hms, frac, offset = m.groups()
    if offset is None:
        raise _unprocessable(
            f"{name}: {value!r} has no UTC offset; give one explicitly (e.g. {TIME_EXAMPLE})"
        )
    if offset in ("Z", "z"):
        offset = "+00:00"
    elif len(offset) == 3:
        offset += ":00"
    elif ":" not in offset:
        offset = f"{offset[:3]}:{offset[3:]}"
    micro = f".{frac[:6].ljust(6, '0')}" if frac else ""
    try:
        dt = datetime.fromisoformat(f"{day}T{hms}{micro}{offset}").astimezone(UTC)
    except ValueError:
        raise _unprocessable(
            f"{name}: {value!r} is not a valid time (check the date, time and offset)"
        ) from None
    except OverflowError:  # year 1 or 9999 shifted by its offset
        dt = MIN_TIME - timedelta(days=1)
    if not MIN_TIME <= dt < MAX_TIME:
        raise _unprocessable(
            f"{name}: {value!r} is outside {MIN_TIME:%Y-%m-%d}..{MAX_TIME:%Y-%m-%d} (UTC)"
        )
    return dt


def iso(dt: datetime) -> str:
    """A timestamp as ISO-8601 in IST (``+05:30``)."""
    return dt.astimezone(IST).isoformat()


_TIME_SCHEMA = {"format": "date-time"}
StartQuery = Annotated[
    str,
    Query(
        description="range start, inclusive: ISO-8601 with an explicit offset (Z or ±hh:mm), "
        f"from {MIN_TIME:%Y-%m-%d} to {MAX_TIME:%Y-%m-%d}",
        max_length=64,
        examples=[TIME_EXAMPLE],
        json_schema_extra=_TIME_SCHEMA,
    ),
]
EndQuery = Annotated[
    str,
    Query(
        description="range end, exclusive: ISO-8601 with an explicit offset (Z or ±hh:mm), "
        f"from {MIN_TIME:%Y-%m-%d} to {MAX_TIME:%Y-%m-%d}",
        max_length=64,
        examples=["2025-01-06T15:30:00+05:30"],
        json_schema_extra=_TIME_SCHEMA,
    ),
]
_INT64 = {"format": "int64"}


def _token(description: str) -> object:
    return Query(
        gt=0, le=INT64_MAX, description=description, examples=[738561], json_schema_extra=_INT64
    )


TokenQuery = Annotated[int, _token("instrument token (Kite-style)")]
OptionalTokenQuery = Annotated[int | None, _token("only this instrument token")]
Token = Annotated[int, Field(gt=0, le=INT64_MAX, json_schema_extra=_INT64)]
"""An instrument token inside a list parameter."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive


def time_range(start: StartQuery, end: EndQuery) -> TimeRange:
    """Dependency: a validated ``[start, end)``."""
    s, e = parse_time("start", start), parse_time("end", end)
    if s >= e:
        raise _unprocessable(f"start ({iso(s)}) must be before end ({iso(e)})")
    return TimeRange(s, e)


# What a time-range route takes and how it fails (the error bodies in the OpenAPI document).
Window = Annotated[TimeRange, Depends(time_range)]
ERRORS: dict[int | str, dict[str, object]] = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}}


_CURSOR = struct.Struct(">qq")  # exchange_ts (epoch µs), sequence_id


def encode_cursor(exchange_ts_us: int, sequence_id: int) -> str:
    """Opaque keyset position: base64url of (exchange_ts µs, sequence_id)."""
    return base64.urlsafe_b64encode(_CURSOR.pack(exchange_ts_us, sequence_id)).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (exchange_ts, sequence_id) after which the next page starts; 422 if malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        us, seq = _CURSOR.unpack(raw)
        return to_datetime_us(us), seq
    except (binascii.Error, struct.error, ValueError, OverflowError):
        raise _unprocessable(
            "cursor: not a cursor returned by this API (pass next_cursor unchanged)"
        ) from None


CursorQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="next_cursor of the previous page, unchanged",
        # Declared for clients; checked by decode_cursor, whose message says what to do.
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]{1,64}$"},
    ),
]


def cursor_after(dt: datetime, sequence_id: int) -> str:
    return encode_cursor(to_epoch_us(dt), sequence_id)


_UNKNOWN_SQL = """
SELECT t FROM unnest($1::bigint[]) AS t
WHERE NOT EXISTS (SELECT 1 FROM instruments i WHERE i.instrument_token = t)
  AND NOT EXISTS (SELECT 1 FROM ticks k WHERE k.instrument_token = t)
"""


async def ensure_known(conn: asyncpg.Connection | asyncpg.Pool, tokens: list[int]) -> None:
    """404 unless every token is in the master or has ticks (the master can lag the feed)."""
    unknown = [r[0] for r in await conn.fetch(_UNKNOWN_SQL, tokens)]
    if unknown:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"unknown instrument_token {', '.join(map(str, unknown))}: "
            "not in the instrument master and no ticks stored",
        )
