"""``GET /v1/instruments``: the instrument master, filtered."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BeforeValidator

from api.auth import Scope, scoped
from api.rest.deps import Pool
from api.rest.models import Exchange, Instrument, InstrumentList

router = APIRouter(tags=["instruments"])

# Filters are optional: "$n IS NULL OR col = $n" keeps one prepared statement for all of them.
_SQL = """
SELECT instrument_token, exchange_token, tradingsymbol, name, exchange, segment,
       instrument_type, lot_size, tick_size, expiry, strike
FROM instruments
WHERE ($1::text IS NULL OR exchange = $1)
  AND ($2::text IS NULL OR segment = $2)
  AND ($3::text IS NULL OR instrument_type = $3)
  AND ($4::text IS NULL OR tradingsymbol ILIKE $4)
ORDER BY exchange, tradingsymbol, instrument_token
LIMIT $5
"""


def _like_pattern(q: str) -> str:
    """Substring match, with LIKE's wildcards in ``q`` taken literally."""
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _upper(v: object) -> object:
    return v.upper() if isinstance(v, str) else v


# Codes as in Kite's instruments CSV ("NFO-OPT", "INDICES", "EQ"): letters, digits, '-'.
_CODE = r"^[A-Za-z0-9-]{1,20}$"
# A tradingsymbol fragment: printable, no control characters (PostgreSQL text holds no NUL).
_SYMBOL_PART = r"^[^\x00-\x1f\x7f]{1,64}$"


@router.get(
    "/instruments",
    response_model=InstrumentList,
    summary="The instrument master",
    **scoped(Scope.READ),
)
async def list_instruments(
    pool: Pool,
    exchange: Annotated[
        Exchange | None,
        BeforeValidator(_upper),
        Query(description="exchange code (case-insensitive)"),
    ] = None,
    segment: Annotated[
        str | None,
        Query(pattern=_CODE, description="e.g. NSE, NFO-OPT, NFO-FUT (case-insensitive)"),
    ] = None,
    instrument_type: Annotated[
        str | None, Query(pattern=_CODE, description="EQ, FUT, CE, PE … (case-insensitive)")
    ] = None,
    q: Annotated[
        str | None,
        Query(pattern=_SYMBOL_PART, description="case-insensitive tradingsymbol substring"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=5000, description="max rows")] = 100,
) -> InstrumentList:
    rows = await pool.fetch(
        _SQL,
        exchange,
        segment.upper() if segment else None,
        instrument_type.upper() if instrument_type else None,
        _like_pattern(q) if q else None,
        limit,
    )
    items = [Instrument.model_validate(dict(r)) for r in rows]
    return InstrumentList(instruments=items, count=len(items))
