"""``GET /v1/ticks``: stored ticks of one instrument, keyset-paginated by an opaque cursor."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Response

from api.auth import Scope, scoped
from api.rest.deps import Pool
from api.rest.models import TickPage
from api.rest.params import (
    ERRORS,
    CursorQuery,
    TokenQuery,
    Window,
    cursor_after,
    decode_cursor,
    ensure_known,
    iso,
)
from nadi.tick import TICK_MEASURES

router = APIRouter(tags=["ticks"])

# Keyset page on the unique index (instrument_token, exchange_ts, sequence_id): each page is an
# index range scan starting at the cursor, whatever the page number (no OFFSET).
_SQL = """
SELECT exchange_ts, sequence_id, last_price, last_qty, volume, oi, bid, ask, bid_qty, ask_qty,
       status, feed
FROM ticks
WHERE instrument_token = $1
  AND (exchange_ts, sequence_id) > ($2, $3)
  AND exchange_ts >= $4 AND exchange_ts < $5
ORDER BY exchange_ts, sequence_id
LIMIT $6
"""
_FIELDS = TICK_MEASURES


@router.get(
    "/ticks",
    response_model=TickPage,
    responses=ERRORS,
    summary="Stored ticks of one instrument, oldest first, paginated",
    **scoped(Scope.READ),
)
async def get_ticks(
    pool: Pool,
    instrument_token: TokenQuery,
    rng: Window,
    limit: Annotated[int, Query(ge=1, le=10_000, description="ticks per page")] = 1000,
    cursor: CursorQuery = None,
) -> Response:
    after_ts, after_seq = decode_cursor(cursor) if cursor else (rng.start, -1)
    async with pool.acquire() as conn:
        # One row more than asked tells whether another page exists.
        rows = await conn.fetch(
            _SQL, instrument_token, after_ts, after_seq, rng.start, rng.end, limit + 1
        )
        if not rows and cursor is None:
            await ensure_known(conn, [instrument_token])
    more = len(rows) > limit
    rows = rows[:limit]
    ticks = [
        {
            "exchange_ts": iso(r[0]),
            "sequence_id": r[1],
            **{f: r[i + 2] for i, f in enumerate(_FIELDS)},
            "status": r[10],
            "feed": r[11],
        }
        for r in rows
    ]
    body = {
        "instrument_token": instrument_token,
        "ticks": ticks,
        "next_cursor": cursor_after(rows[-1][0], rows[-1][1]) if more else None,
    }
    return Response(orjson.dumps(body), media_type="application/json")
