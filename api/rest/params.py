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
from fastapi import HTTPException, Query, status

from nadi.replay import to_datetime_us, to_epoch_us

IST = timezone(timedelta(hours=5, minutes=30), "IST")

# An unescaped '+' in a query string arrives as a space ("09:15:00 05:30"): restore it rather
# than reject the most common way people type an IST time into a URL.
_SPACE_OFFSET = re.compile(r"^(.*\d)\s(\d{2}:?\d{2})$")

TIME_EXAMPLE = "2025-01-06T09:15:00+05:30"


def parse_time(name: str, value: str) -> datetime:
    """ISO-8601 with an explicit offset -> aware datetime; 422 with the reason otherwise."""
    text = value.strip()
    m = _SPACE_OFFSET.match(text)
    if m:
        text = f"{m.group(1)}+{m.group(2)}"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"{name}: {value!r} is not an ISO-8601 time (e.g. {TIME_EXAMPLE})",
        ) from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"{name}: {value!r} has no UTC offset; give one explicitly (e.g. {TIME_EXAMPLE})",
        )
    return dt.astimezone(UTC)


def iso(dt: datetime) -> str:
    """A timestamp as ISO-8601 in IST (``+05:30``)."""
    return dt.astimezone(IST).isoformat()


StartQuery = Annotated[
    str,
    Query(
        description="range start, inclusive: ISO-8601 with an explicit offset",
        examples=[TIME_EXAMPLE],
    ),
]
EndQuery = Annotated[
    str,
    Query(
        description="range end, exclusive: ISO-8601 with an explicit offset",
        examples=["2025-01-06T15:30:00+05:30"],
    ),
]
TokenQuery = Annotated[
    int, Query(gt=0, description="instrument token (Kite-style)", examples=[738561])
]


@dataclass(frozen=True, slots=True)
class TimeRange:
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive


def time_range(start: StartQuery, end: EndQuery) -> TimeRange:
    """Dependency: a validated ``[start, end)``."""
    s, e = parse_time("start", start), parse_time("end", end)
    if s >= e:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"start ({iso(s)}) must be before end ({iso(e)})",
        )
    return TimeRange(s, e)


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
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="cursor: not a cursor returned by this API (pass next_cursor unchanged)",
        ) from None


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
