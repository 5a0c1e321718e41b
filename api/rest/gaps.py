"""``GET /v1/gaps``: recorded holes in instruments' sequence ids (``sequence_gaps``)."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Scope, scoped
from api.rest.deps import Pool
from api.rest.models import Gap, GapList, GapStatus
from api.rest.params import OptionalTokenQuery, iso

router = APIRouter(tags=["gaps"])

_SQL = """
SELECT id, instrument_token, trading_day, from_seq, to_seq, status, detected_at, repaired_at,
       repaired_count, repair_attempts, reason
FROM sequence_gaps
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::bigint IS NULL OR instrument_token = $2)
  AND ($3::date IS NULL OR trading_day = $3)
ORDER BY trading_day DESC, instrument_token, from_seq
LIMIT $4
"""


@router.get(
    "/gaps",
    response_model=GapList,
    summary="Sequence gaps, newest trading day first",
    **scoped(Scope.READ),
)
async def list_gaps(
    pool: Pool,
    status: Annotated[
        GapStatus | None, Query(description="open, repaired or unrecoverable")
    ] = None,
    instrument_token: OptionalTokenQuery = None,
    trading_day: Annotated[
        date | None,
        Query(description="Asia/Kolkata date, YYYY-MM-DD", examples=["2025-01-06"]),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> GapList:
    rows = await pool.fetch(_SQL, status, instrument_token, trading_day, limit)
    gaps = [
        Gap(
            id=r["id"],
            instrument_token=r["instrument_token"],
            trading_day=r["trading_day"],
            from_seq=r["from_seq"],
            to_seq=r["to_seq"],
            status=r["status"],
            detected_at=iso(r["detected_at"]),
            repaired_at=iso(r["repaired_at"]) if r["repaired_at"] else None,
            repaired_count=r["repaired_count"],
            repair_attempts=r["repair_attempts"],
            reason=r["reason"],
        )
        for r in rows
    ]
    return GapList(gaps=gaps, count=len(gaps))
